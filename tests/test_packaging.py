"""What ``pip install lm-eval-lowrank`` brings is enough to run it, and a missing extra is a one-line error."""

from __future__ import annotations

import ast
import importlib.util
import sys
from importlib.metadata import PackageNotFoundError, packages_distributions, requires
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import lm_eval_lowrank

# Left to the user on purpose (a CPU or a CUDA build): see pyproject.toml.
USER_PROVIDED = {"torch"}


def _install_closure(dist: str) -> set[str]:
    """The distributions a plain install of ``dist`` brings: its requirements outside extras, transitively."""
    seen: set[str] = set()
    todo = [dist]
    while todo:
        name = todo.pop()
        try:
            reqs = requires(name) or []
        except PackageNotFoundError:
            continue
        for line in reqs:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            key = canonicalize_name(req.name)
            if key not in seen:
                seen.add(key)
                todo.append(key)
    return seen


def _top_level_imports(path: Path) -> set[str]:
    """Top-level module names imported when ``path`` is imported (not inside functions or TYPE_CHECKING)."""
    names: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
            elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)

    visit(ast.parse(path.read_text()).body)
    return names


def _missing_from_install(paths: list[Path]) -> dict[str, str]:
    closure = _install_closure("lm-eval-lowrank") | {canonicalize_name("lm-eval-lowrank")}
    providers = packages_distributions()
    missing = {}
    for path in paths:
        for module in sorted(_top_level_imports(path)):
            if module in sys.stdlib_module_names or module in USER_PROVIDED or module.startswith("lm_eval_lowrank"):
                continue
            dists = {canonicalize_name(d) for d in providers.get(module, [])}
            if not dists & closure:
                missing[module] = path.name
    return missing


def test_a_plain_install_brings_every_module_hf_tucker_imports():
    """lm-eval asks for accelerate (which its HFLM imports) only in its [hf] extra: a plain install of this
    package must bring it itself, or ``lm_eval --model hf-tucker`` fails on a fresh machine."""
    hflm = Path(importlib.util.find_spec("lm_eval.models.huggingface").origin)
    ours = sorted(Path(lm_eval_lowrank.__file__).parent.rglob("*.py"))
    assert _missing_from_install([hflm, *ours]) == {}


def test_the_check_sees_a_module_no_dependency_brings(tmp_path):
    stray = tmp_path / "stray.py"
    stray.write_text("import os\nimport accelerate\nimport not_a_real_module_xyz\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import peft\n")
    assert _missing_from_install([stray]) == {"not_a_real_module_xyz": "stray.py"}


def test_a_missing_extra_is_one_line_before_any_download(monkeypatch, tmp_path):
    from lm_eval_lowrank import assets
    from lm_eval_lowrank.optional import MissingDependencyError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    monkeypatch.setattr(assets, "_fetch_gguf", lambda *a: pytest.fail("downloaded"))
    with pytest.raises(MissingDependencyError, match=r"^converting the embedded default model .* needs the gguf package: pip install 'lm-eval-lowrank\[gguf\]'$"):
        assets.smollm2_path(tmp_path / "models")


def test_analyze_heatmap_without_matplotlib_fails_before_the_model_loads(monkeypatch, tmp_path):
    import transformers
    from click.testing import CliRunner

    from lm_eval_lowrank.cli.analyze import analyze

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
    result = CliRunner().invoke(analyze, [str(tmp_path), "--heatmap", str(tmp_path / "h.png")])
    assert "--heatmap needs the matplotlib package: pip install 'lm-eval-lowrank[plots]'" in str(result.exception)


def test_the_cached_tokenizer_reads_under_transformers_4_and_5(tmp_path, smollm2_dir):
    """transformers 5 saves the fast tokenizer as class TokenizersBackend, which transformers 4 cannot load; a
    cache made before the fix is mended when it is next used, and tokenizes as before."""
    import json
    import shutil

    from transformers import AutoTokenizer

    from lm_eval_lowrank.assets import SMOLLM2_NAME, _DONE_MARKER, smollm2_path

    cached = tmp_path / SMOLLM2_NAME
    cached.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", _DONE_MARKER):
        shutil.copy(smollm2_dir / name, cached / name)
    config = json.loads((cached / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "TokenizersBackend"  # as transformers 5 writes it
    (cached / "tokenizer_config.json").write_text(json.dumps(config))
    assert smollm2_path(tmp_path) == cached
    assert json.loads((cached / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    text = "The decomposed layer keeps 7.87 % fewer parameters."
    mended, original = AutoTokenizer.from_pretrained(cached), AutoTokenizer.from_pretrained(smollm2_dir)
    assert mended(text)["input_ids"] == original(text)["input_ids"]
    assert (mended.eos_token, mended.bos_token, len(mended)) == (original.eos_token, original.bos_token, len(original))
