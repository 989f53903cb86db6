"""Compressed checkpoints (save once, reload without decomposing) and the decomposition cache.

A compressed checkpoint is a folder with:

- ``lowrank_model.safetensors``: every parameter of the model, with each decomposed linear
  stored as its factors (``<path>.first``, ``<path>.core`` for the tucker layout, ``<path>.last``,
  ``<path>.bias``) instead of its dense weight; tied weights are stored once. The file is
  deliberately *not* named ``model.safetensors``: plain ``from_pretrained`` then fails loudly
  instead of loading a model with randomly initialised projections.
- ``config.json`` (+ ``generation_config.json``): the source model's HF config;
- the tokenizer files;
- ``lowrank_manifest.json``: method, ranks per module, layout, layers, tensors, source model and
  revision, package version, sha256 of each weight file, parameter counts, healing history.
  It is written last, so a folder with a manifest is complete.

Reload with :func:`load_compressed` (or ``lm_eval --model hf-tucker --model_args pretrained=DIR``):
the model skeleton is built from the config with parameters on the meta device, the planned
linears are swapped for :class:`LowRankLinear`, and the state dict is assigned in place.

The decomposition cache (:class:`DecompositionCache`) keeps the factors of decompose-on-load
runs under ``cache_root()/decomp/``, keyed by a checksum of the source weight files, a sample
of the loaded weights, and every setting that changes the factors. One entry is one
safetensors file written to a temp file and renamed, so concurrent writers of the same entry
never leave a torn file (the last complete writer wins); a bad entry is recomputed with a warning.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as _dt
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from . import __version__
from .methods import ALGORITHM_VERSION
from .modules import FACTOR_NAMES, LAYOUTS, LowRankExpertWeights, LowRankLinear, factor_shapes, install_expert_weights, is_experts_module
from .spec import FACTOR_FIELDS as _FACTOR_FIELDS

FORMAT = "lm-eval-lowrank/compressed"
FORMAT_VERSION = 2  # 2: modules may be mixture-of-experts factors (entries with "experts")
MANIFEST_NAME = "lowrank_manifest.json"
WEIGHTS_NAME = "lowrank_model.safetensors"
CACHE_FORMAT_VERSION = 2  # 2: modules may be mixture-of-experts factors (entries with "experts")


class CheckpointError(ValueError):
    """A compressed checkpoint that cannot be used. The message is one line naming the path."""


# -- files: hashing and atomic writes ------------------------------------------------------------


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _tmp_path(target: Path) -> Path:
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    return Path(name)


def _hold(folder: Path) -> int:
    """Lock ``folder`` for this process (an flock on the folder itself, freed when the process ends, however it
    ends), so that a later save can tell a folder a killed run left from one another run is writing."""
    fd = os.open(folder, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _abandoned(folder: Path) -> bool:
    """True when no live process holds ``folder`` (see :func:`_hold`)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def _clear_abandoned_saves(out: Path) -> None:
    """What a save killed mid-way (SIGKILL) left beside ``out``: its work folder (``.NAME.*.tmp``, hundreds of MB
    never reused) is deleted, and an old checkpoint moved aside (``.NAME.old-*``) goes back to ``out`` when ``out``
    is missing (the kill fell between the two moves), else is deleted."""
    if not out.parent.is_dir():
        return
    for folder in sorted(out.parent.glob(f".{out.name}.*")):
        if not folder.is_dir() or not (folder.name.endswith(".tmp") or ".old-" in folder.name) or not _abandoned(folder):
            continue
        kept = folder / out.name
        if ".old-" in folder.name and not out.exists() and (kept / MANIFEST_NAME).is_file():
            os.replace(kept, out)
        shutil.rmtree(folder, ignore_errors=True)


def _tmp_dir(target: Path) -> Path:
    """A fresh folder beside ``target``, with the permissions a plain mkdir would give (mkdtemp's are 0700)."""
    work = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    os.chmod(work, 0o777 & ~_umask())
    return work


@contextlib.contextmanager
def _atomic_target(target: Path) -> Iterator[Path]:
    """Yield a temp path beside ``target``; on success fsync it and ``os.replace`` it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(target)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's file (and safetensors' rewrite) is private: 0600
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with _atomic_target(Path(path)) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _save_tensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    with _atomic_target(path) as tmp:
        save_file(dict(tensors), str(tmp), metadata=metadata)


def _tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and raw bytes (order-independent of dict order)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        if t.numel():
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (fcntl); a no-op where fcntl is missing (Windows)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class FileHashIndex:
    """sha256 of files, memoised by (real path, size, mtime_ns, inode) in a small JSON index.

    A changed file changes its size or mtime, so it is hashed again; an unchanged multi-GB
    safetensors file is hashed once per machine instead of once per run.
    """

    def __init__(self, index_path: str | os.PathLike) -> None:
        self.path = Path(index_path)

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}  # a missing or damaged index only costs a re-hash

    def digest(self, file: str | os.PathLike) -> str:
        real = os.path.realpath(file)
        st = os.stat(real)
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
        entry = self._read().get(real)
        if isinstance(entry, dict) and entry.get("stamp") == stamp and isinstance(entry.get("sha256"), str):
            return entry["sha256"]
        digest = sha256_file(real)
        with _file_lock(self.path.with_name(self.path.name + ".lock")):
            index = self._read()
            index[real] = {"stamp": stamp, "sha256": digest}
            atomic_write_text(self.path, json.dumps(index, indent=0, sort_keys=True))
        return digest


def _memoised_sha256(file: Path) -> str:
    """sha256 of ``file``, hashed once per file version (see :class:`FileHashIndex`): a checkpoint
    is verified on every load, and hashing it each time cost as much as the load itself."""
    try:
        return FileHashIndex(_cache_dir() / "file_hashes.json").digest(file)
    except OSError:  # an unwritable cache: hash every time
        return sha256_file(file)


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def source_digest(folder: str | os.PathLike, index: FileHashIndex | None = None) -> str | None:
    """One checksum of a model folder's weight files and config (None: no weight files found)."""
    folder = Path(folder)
    index = index or FileHashIndex(_cache_dir() / "file_hashes.json")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name.endswith(_WEIGHT_SUFFIXES) and not p.name.startswith("."))
    if not files:
        return None
    h = hashlib.sha256()
    for p in files + [folder / "config.json"]:
        if p.is_file():
            h.update(f"{p.name}:{index.digest(p)}\n".encode())
    return h.hexdigest()


def _cache_dir() -> Path:
    from .assets import cache_root

    return cache_root() / "decomp"


# -- model surgery helpers ------------------------------------------------------------------------


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, leaf, new)


def lowrank_modules(model: nn.Module) -> dict[str, LowRankLinear | LowRankExpertWeights]:
    """Every decomposed module: LowRankLinear, and the factors of decomposed expert projections."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (LowRankLinear, LowRankExpertWeights))}


def _module_entry(mod: LowRankLinear | LowRankExpertWeights) -> dict[str, Any]:
    entry = {"rank": mod.rank, "in_features": mod.in_features, "out_features": mod.out_features, "layout": mod.layout}
    if isinstance(mod, LowRankExpertWeights):
        return {**entry, "bias": False, "experts": mod.num_experts, "transposed": mod.transposed}
    return {**entry, "bias": mod.bias is not None}


def _expected_factor_shapes(path: str, info: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    shapes = factor_shapes(
        int(info["in_features"]), int(info["out_features"]), int(info["rank"]), str(info.get("layout")), bool(info.get("bias")), int(info.get("experts") or 0)
    )
    return {f"{path}.{k}": v for k, v in shapes.items()}


def _install_factors(model: nn.Module, path: str, info: Mapping[str, Any], parameters: Mapping[str, torch.Tensor] | None, requires_grad: bool = True) -> None:
    """Put the module a manifest/cache entry describes at ``path``: a LowRankLinear in place of a linear, or the
    factors of an expert projection in place of its 3-D parameter. ``parameters`` None: empty, on the meta device."""
    layout = str(info.get("layout", "folded"))
    dims = (int(info["in_features"]), int(info["out_features"]), int(info["rank"]))
    if info.get("experts"):
        owner_path, _, name = path.rpartition(".")
        owner = model.get_submodule(owner_path)
        if not is_experts_module(owner) or not isinstance(owner._parameters.get(name), nn.Parameter):
            raise CheckpointError(f"{path} is not an expert projection of this architecture")
        transposed = bool(info.get("transposed"))
        if parameters is None:
            new = LowRankExpertWeights.empty(int(info["experts"]), *dims, layout=layout, transposed=transposed, device="meta")
        else:
            new = LowRankExpertWeights(int(info["experts"]), *dims, layout=layout, transposed=transposed, parameters=parameters, requires_grad=requires_grad)
        install_expert_weights(owner, name, new)
        return
    model.get_submodule(path)  # AttributeError if the architecture lacks it
    if parameters is None:
        new = LowRankLinear(*dims, layout=layout, bias=bool(info.get("bias")), device="meta")
    else:
        new = LowRankLinear(*dims, layout=layout, parameters=parameters, requires_grad=requires_grad)
    _set_submodule(model, path, new)


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Create parameters on the meta device but buffers for real.

    Non-persistent buffers (RoPE ``inv_freq``) are not in any state dict, so they must be
    computed at construction exactly as ``from_pretrained`` computes them.
    """
    original = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(self, name, param)
        if param is not None and param.device.type != "meta":
            p = self._parameters[name]
            self._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def _no_init_weights() -> contextlib.AbstractContextManager[Any]:
    # Random init of parameters that the state dict overwrites anyway is most of the skeleton's cost.
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return contextlib.nullcontext()
    return no_init_weights()


def _resolve_dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    s = str(dtype).strip().lower()
    if s in ("", "auto", "none"):
        return None
    value = getattr(torch, s.replace("torch.", ""), None)
    if not isinstance(value, torch.dtype):
        raise CheckpointError(f"dtype={dtype!r} is invalid: expected auto, float32, bfloat16 or float16")
    return value


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# -- saving ---------------------------------------------------------------------------------------


def _dedup_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict with tied tensors stored once: (tensors, alias -> stored name)."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for name, t in model.state_dict().items():
        if t.device.type == "meta":
            raise CheckpointError(f"cannot save {name}: the tensor is on the meta device (not loaded)")
        ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if ident in seen:
            aliases[name] = seen[ident]
            continue
        seen[ident] = name
        tensors[name] = t.detach().to("cpu").contiguous()
    return tensors, aliases


def check_output_folder(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """The resolved folder a checkpoint may be written to, or a one-line CheckpointError: the CLI asks before any
    weights load, so that a taken folder costs no decomposition or healing. What a killed save left beside it is
    cleared first (:func:`_clear_abandoned_saves`), so the checks see the folder as it stands."""
    out = Path(out_dir).expanduser().resolve()
    _clear_abandoned_saves(out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"--out {out} is a file; give a folder path")
    parent = out.parent
    while not parent.exists():  # the folder to be made: checked now, not after the decomposition
        parent = parent.parent
    if not parent.is_dir():
        raise CheckpointError(f"--out {out}: {parent} is a file; give a folder path")
    if not out.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"--out {out}: {parent} is not writable")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise CheckpointError(f"--out {out} exists and is not empty; choose a new folder or pass --overwrite")
        if not (out / MANIFEST_NAME).is_file():
            raise CheckpointError(f"--out {out} is not a compressed checkpoint; refusing to overwrite it")
    return out


def save_compressed(
    model: nn.Module,
    out_dir: str | os.PathLike,
    decomposition: Any,
    tokenizer: Any = None,
    source: Mapping[str, Any] | None = None,
    healing: list[dict[str, Any]] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` (with its LowRankLinear modules in place) as a compressed checkpoint.

    ``decomposition`` is the :class:`DecompositionReport` of the run (or its ``to_dict()``, or the
    ``decomposition`` block of a loaded checkpoint's manifest). ``source``: model id, revision and
    weight checksum of the dense model. The folder is built beside ``out_dir`` and renamed into
    place, so a killed run leaves no half-written checkpoint under ``out_dir``.
    """
    out = check_output_folder(out_dir, overwrite)
    dec = decomposition.to_dict() if hasattr(decomposition, "to_dict") else dict(decomposition)
    dec.pop("cache", None)
    dec.pop("loaded_from_checkpoint", None)
    dec.pop("load_seconds", None)
    mods = lowrank_modules(model)
    planned = set(dec.get("modules") or [])
    if planned != set(mods):
        missing = sorted(planned - set(mods)) or sorted(set(mods) - planned)
        raise CheckpointError(f"model and decomposition report disagree on the decomposed modules (e.g. {missing[:1]}); save the model the report describes")

    tensors, aliases = _dedup_state(model)
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in tensors.values() if t.is_floating_point()})
    out.parent.mkdir(parents=True, exist_ok=True)
    work = _tmp_dir(out)
    held = [_hold(work)]
    trash: Path | None = None  # where the old checkpoint waits while the new one moves in
    try:
        _save_tensors(tensors, work / WEIGHTS_NAME, metadata={"format": FORMAT})
        config = getattr(model, "config", None)
        if config is None:
            raise CheckpointError("model has no .config; only Hugging Face PreTrainedModel instances can be saved")
        config.save_pretrained(work)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            with contextlib.suppress(Exception):  # an invalid generation config must not block saving
                gen.save_pretrained(work)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(work))
        from .decompose import count_parameters

        params_after = count_parameters(model)
        layers = dec.get("layers") or []
        manifest = {
            "format": FORMAT,
            # readers before version 2 would take expert factors for linears: they are told to upgrade instead
            "format_version": FORMAT_VERSION if any(isinstance(m, LowRankExpertWeights) for m in mods.values()) else 1,
            "package_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "source": dict(source or {}),
            "method": dec.get("method"),
            "layout": dec.get("layout"),
            "adapter": dec.get("adapter"),
            "layers": layers,
            "tensors": dec.get("tensors") or [],
            "ranks": {p: m.rank for p, m in mods.items()},
            "modules": {p: _module_entry(m) for p, m in mods.items()},
            "tied": aliases,
            "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
            "params": {
                "before": dec.get("params_before"),
                "after": params_after,
                "removed": None if dec.get("params_before") is None else dec["params_before"] - params_after,
                "reduction": None if not dec.get("params_before") else 1.0 - params_after / dec["params_before"],
            },
            "weights": {WEIGHTS_NAME: {"sha256": sha256_file(work / WEIGHTS_NAME), "bytes": (work / WEIGHTS_NAME).stat().st_size, "tensors": sorted(tensors)}},
            "decomposition": dec,
            "healing": list(healing or []),
        }
        # Written last: a folder holding a manifest is complete.
        atomic_write_text(work / MANIFEST_NAME, json.dumps(manifest, indent=1, sort_keys=False))
        if out.exists():
            # A fresh folder for the old one: a leftover ".name.old-PID" of a killed run (PIDs repeat in containers)
            # would make the move fail after all the work.
            trash = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            held.append(_hold(trash))
            os.replace(out, trash / out.name)
            os.replace(work, out)
        else:
            os.replace(work, out)
    finally:
        # Ctrl-C between the two moves left no checkpoint at --out and deleted the new one: the new one is
        # complete (its manifest is written), so it goes in; failing that, the old one goes back.
        if trash is not None and not out.exists():
            os.replace(work if (work / MANIFEST_NAME).is_file() else trash / out.name, out)
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
        for fd in held:
            os.close(fd)
    return out


# -- loading --------------------------------------------------------------------------------------


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_manifest_entries(manifest: Mapping[str, Any], mpath: Path) -> None:
    """One-line errors for module and weight entries a reader would trip over (an edited or damaged manifest)."""
    for path, info in manifest["modules"].items():
        if not isinstance(info, dict):
            raise CheckpointError(f"{mpath}: modules[{path!r}] is not an object; the checkpoint is damaged")
        for field in ("in_features", "out_features", "rank"):
            if not _is_count(info.get(field)):
                raise CheckpointError(f"{mpath}: modules[{path!r}].{field} is {info.get(field)!r}, not a whole number >= 1; the checkpoint is damaged")
        if info.get("layout", "folded") not in LAYOUTS:
            raise CheckpointError(f"{mpath}: modules[{path!r}].layout is {info.get('layout')!r}, valid {', '.join(LAYOUTS)}; the checkpoint is damaged")
        if info.get("experts") not in (None, 0) and not _is_count(info.get("experts")):
            raise CheckpointError(f"{mpath}: modules[{path!r}].experts is {info.get('experts')!r}, not a whole number; the checkpoint is damaged")
    for name, info in manifest["weights"].items():
        if not isinstance(info, dict):
            raise CheckpointError(f"{mpath}: weights[{name!r}] is not an object; the checkpoint is damaged")
    if not isinstance(manifest.get("tied", {}), dict):
        raise CheckpointError(f"{mpath}: 'tied' is not an object; the checkpoint is damaged")


class CompressedCheckpoint:
    """A compressed checkpoint folder: its manifest, integrity checks and model loading."""

    def __init__(self, path: str | os.PathLike, manifest: dict[str, Any]) -> None:
        self.path = Path(path)
        self.manifest = manifest

    @classmethod
    def detect(cls, path: str | os.PathLike) -> CompressedCheckpoint | None:
        """The checkpoint at ``path``, or None when ``path`` is not a folder with our manifest."""
        p = Path(path).expanduser()
        if not (p / MANIFEST_NAME).is_file():
            return None
        return cls.open(p)

    @classmethod
    def open(cls, path: str | os.PathLike) -> CompressedCheckpoint:
        p = Path(path).expanduser().resolve()
        mpath = p / MANIFEST_NAME
        if not p.exists():
            raise CheckpointError(f"{p} does not exist; give a compressed checkpoint (create one with lm-eval-lowrank decompose)")
        if not mpath.is_file():
            raise CheckpointError(f"{p} is not a compressed checkpoint: {MANIFEST_NAME} is missing (create one with lm-eval-lowrank decompose)")
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{mpath} is unreadable or not valid JSON ({type(exc).__name__}); the checkpoint is damaged") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise CheckpointError(f"{mpath} is not a {FORMAT} manifest")
        version = manifest.get("format_version", 1)
        if not _is_count(version):
            raise CheckpointError(f"{mpath} has format_version {version!r}, not a whole number >= 1; the checkpoint is damaged")
        if version > FORMAT_VERSION:
            raise CheckpointError(f"{mpath} has format_version {version}; this lm-eval-lowrank reads <= {FORMAT_VERSION}: upgrade the package")
        for key in ("weights", "modules", "decomposition"):
            if not isinstance(manifest.get(key), dict):
                raise CheckpointError(f"{mpath} lacks the {key!r} block; the checkpoint is damaged")
        _check_manifest_entries(manifest, mpath)
        return cls(p, manifest)

    # -- integrity -------------------------------------------------------------------------
    def verify(self, checksums: bool = True, rehash: bool = False) -> None:
        """Raise :class:`CheckpointError` unless every weight file is whole and matches the manifest.

        A file's sha256 is remembered per (size, mtime, inode), so a load does not hash gigabytes again; a change
        that keeps all three (an in-place write that restores the mtime) is found only with ``rehash=True``."""
        from safetensors import safe_open

        expected: dict[str, tuple[int, ...]] = {}
        for mod_path, info in self.manifest["modules"].items():
            expected.update(_expected_factor_shapes(mod_path, info))
        found: dict[str, tuple[int, ...]] = {}
        for name, info in self.manifest["weights"].items():
            f = self.path / name
            if not f.is_file():
                raise CheckpointError(f"{f} is missing; the checkpoint is incomplete")
            size = f.stat().st_size
            if size != info.get("bytes"):
                raise CheckpointError(f"{f} has {size} bytes, the manifest says {info.get('bytes')}: the file is truncated or was replaced")
            if checksums and (sha256_file(f) if rehash else _memoised_sha256(f)) != info.get("sha256"):
                raise CheckpointError(f"{f} fails its sha256 check against {MANIFEST_NAME}: the file is corrupted")
            try:
                with safe_open(str(f), framework="pt") as sf:
                    for key in sf.keys():
                        found[key] = tuple(sf.get_slice(key).get_shape())
            except Exception as exc:
                raise CheckpointError(f"{f} is not a readable safetensors file ({type(exc).__name__})") from None
            listed = info.get("tensors")
            if listed is not None and sorted(listed) != sorted(found):
                raise CheckpointError(f"{f} holds other tensors than {MANIFEST_NAME} lists: the manifest does not match the weights")
        for key, shape in expected.items():
            if found.get(key) != shape:
                raise CheckpointError(
                    f"{MANIFEST_NAME} in {self.path} does not match the weights: {key} is {found.get(key)} in the file, the manifest implies {shape}"
                )
        dense = [p for p, info in self.manifest["modules"].items() if f"{p}.weight" in found or (info.get("experts") and p in found)]
        if dense:
            raise CheckpointError(f"{MANIFEST_NAME} in {self.path} does not match the weights: {dense[0]} is stored dense")

    # -- model ---------------------------------------------------------------------------
    def load_model(
        self,
        dtype: Any = None,
        device: str | torch.device | None = None,
        verify: bool = True,
        device_map: str | Mapping[str, Any] | None = None,
        max_memory: Mapping[Any, Any] | None = None,
        offload_folder: str | os.PathLike | None = None,
    ) -> Any:
        """Build the model with LowRankLinear modules in place (eval mode).

        ``dtype``: None/"auto" keeps the stored dtype; ``device``: default cuda when available. ``device_map``
        spreads it over devices as ``from_pretrained`` does (``"auto"``, ``"balanced"``, ``"balanced_low_0"``,
        ``"sequential"`` or a module -> device mapping, within ``max_memory``); what does not fit is offloaded
        to the CPU or to ``offload_folder``. A strategy is resolved on the empty model, and each tensor is read
        straight to its device, so the host never holds the layers that go to the GPUs.
        """
        from safetensors.torch import load_file
        from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

        if isinstance(device_map, Mapping) and set(device_map) == {""}:
            device, device_map = device_map[""], None  # one device for the whole model
        if isinstance(device_map, str) and device_map not in DEVICE_MAP_STRATEGIES:
            raise CheckpointError(f"device_map={device_map!r} is invalid: valid {', '.join(DEVICE_MAP_STRATEGIES)} or a module -> device mapping")
        if verify:
            self.verify()
        target_dtype = _resolve_dtype(dtype)
        device = torch.device("cpu" if device_map is not None else device if device is not None else _default_device())
        config = AutoConfig.from_pretrained(str(self.path))
        stored = self.manifest.get("dtype")
        skeleton_dtype = target_dtype or (getattr(torch, stored) if isinstance(stored, str) else None) or torch.float32
        with _parameters_on_meta(), _no_init_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=skeleton_dtype)
        for mod_path, info in self.manifest["modules"].items():
            try:
                _install_factors(model, mod_path, info, None)
            except (AttributeError, CheckpointError):
                raise CheckpointError(f"{MANIFEST_NAME} in {self.path} names module {mod_path}, which the config's architecture lacks") from None
        placement = None if device_map is None else resolve_device_map(model, device_map, max_memory)
        if placement is not None and "disk" in placement.values() and offload_folder is None:
            raise CheckpointError("offload_folder is required: the device map puts some modules on disk")
        state: dict[str, torch.Tensor] = {}
        fp32 = _kept_in_fp32(model, target_dtype)
        for name in self.manifest["weights"]:
            if placement is None:
                state.update(load_file(str(self.path / name), device="cpu" if device.type == "cpu" else str(device)))  # refuses "cpu:0"
            else:
                state.update(_read_placed(self.path / name, placement, target_dtype, fp32))
        if target_dtype is not None:
            state = {k: (v.to(_load_dtype(k, target_dtype, fp32)) if v.is_floating_point() else v) for k, v in state.items()}
        result = model.load_state_dict(state, strict=False, assign=True)
        tied = self.manifest.get("tied") or {}
        missing = [k for k in result.missing_keys if k not in tied]
        if missing or result.unexpected_keys:
            what = f"missing {missing[0]}" if missing else f"unexpected {result.unexpected_keys[0]}"
            raise CheckpointError(f"{self.path}: the weights do not fit the config's architecture ({what})")
        params = dict(model.named_parameters(remove_duplicate=False))
        for alias, name in tied.items():
            # Re-tie after assign: the alias must be the very same Parameter as its source.
            if name not in params or alias not in params:
                raise CheckpointError(f"{MANIFEST_NAME} in {self.path}: tied tensor {alias} -> {name} names no parameter of this architecture")
            _set_submodule_param(model, alias, params[name])
        leftover = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.device.type == "meta"]
        if leftover:
            raise CheckpointError(f"{self.path}: {leftover[0]} was not loaded (no tensor in the checkpoint)")
        if placement is None:
            model.to(device)  # buffers were built on CPU; with a device map, dispatching places them
        gen_path = self.path / "generation_config.json"
        if gen_path.is_file():
            with contextlib.suppress(Exception):
                model.generation_config = GenerationConfig.from_pretrained(str(self.path))
        model.config.name_or_path = str(self.path)
        model.eval()
        if placement is not None:
            model = dispatch_compressed(model, placement, offload_folder=offload_folder)
        return model

    def report(self) -> dict[str, Any]:
        """The decomposition block for the results JSON."""
        m = self.manifest
        out = dict(m["decomposition"])
        out["original_decomposition_seconds"] = out.get("decomposition_seconds")
        out["decomposition_seconds"] = 0.0
        out["cache"] = None
        out["loaded_from_checkpoint"] = str(self.path)
        out["checkpoint"] = {
            "format_version": m.get("format_version"),
            "package_version": m.get("package_version"),
            "created": m.get("created"),
            "source": m.get("source"),
            "weights": {k: {"sha256": v.get("sha256"), "bytes": v.get("bytes")} for k, v in m["weights"].items()},
            "healing": m.get("healing") or [],
        }
        return out

    def weight_bytes(self) -> int:
        return sum(int(v.get("bytes", 0)) for v in self.manifest["weights"].values())


def _set_submodule_param(model: nn.Module, name: str, param: nn.Parameter) -> None:
    parent_path, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, param)


def load_compressed(path: str | os.PathLike, dtype: Any = None, device: str | torch.device = "cpu", verify: bool = True, **placement: Any) -> Any:
    """Load a compressed checkpoint as a transformers model (no trust_remote_code needed).

    ``model = lm_eval_lowrank.checkpoint.load_compressed(DIR)``; the tokenizer is
    ``AutoTokenizer.from_pretrained(DIR)``. ``placement``: ``device_map``, ``max_memory``, ``offload_folder``
    (:meth:`CompressedCheckpoint.load_model`). Raises :class:`CheckpointError` on a damaged folder.
    """
    return CompressedCheckpoint.open(path).load_model(dtype=dtype, device=device, verify=verify, **placement)


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


def resolve_device_map(model: nn.Module, device_map: str | Mapping[str, Any], max_memory: Mapping[Any, Any] | None = None) -> dict[str, Any]:
    """A module -> device mapping for ``model`` (its parameters may be on the meta device: only sizes are read), as
    ``from_pretrained(device_map=...)`` makes one: a strategy's map is inferred within ``max_memory``, keeping the
    model's no-split blocks (decoder layers) whole."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if not isinstance(device_map, str):
        if set(device_map.values()) == {"disk"}:
            raise CheckpointError("device_map puts every module on disk: nothing would run them; map some to a device")
        return dict(device_map)
    no_split = sorted(set(getattr(model, "_no_split_modules", None) or []))
    budget = max_memory
    if device_map != "sequential":
        budget = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split, low_zero=device_map == "balanced_low_0")
    resolved = dict(infer_auto_device_map(model, max_memory=budget, no_split_module_classes=no_split))
    if set(resolved.values()) == {"disk"}:
        raise CheckpointError(f"max_memory={dict(max_memory or {})!r} leaves no device room for any module of the model; give it more")
    return resolved


def _placed_device(name: str, device_map: Mapping[str, Any]) -> torch.device:
    """Where tensor ``name`` goes under ``device_map``: its longest mapped prefix's device (the CPU for "disk")."""
    best = max((k for k in device_map if k == "" or name == k or name.startswith(k + ".")), key=len, default=None)
    if best is None:
        raise CheckpointError(f"device_map places no module of {name}")
    where = device_map[best]
    if isinstance(where, int):  # an accelerator index, as accelerate writes GPUs
        accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        return torch.device(accelerator.type if accelerator is not None else "cuda", where)
    return torch.device("cpu" if where == "disk" else where)


def _kept_in_fp32(model: nn.Module, dtype: torch.dtype | None) -> re.Pattern | None:
    """The tensors ``from_pretrained(dtype=...)`` keeps in fp32 (a model's ``_keep_in_fp32_modules`` under fp16, its
    ``_keep_in_fp32_modules_strict`` under fp16 and bf16, e.g. a router's correction bias), as one pattern searched
    in each tensor name, as transformers matches them; None when nothing is kept."""
    names: set[str] = set()
    if dtype == torch.float16:
        names |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    if dtype in (torch.float16, torch.bfloat16):
        names |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    return re.compile("|".join(n.replace("*", ".*") for n in sorted(names))) if names else None


def _load_dtype(name: str, dtype: torch.dtype, fp32: re.Pattern | None) -> torch.dtype:
    return torch.float32 if fp32 is not None and fp32.search(name) else dtype


def _read_placed(path: Path, device_map: Mapping[str, Any], dtype: torch.dtype | None, fp32: re.Pattern | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, cast to ``dtype`` (fp32 where ``fp32`` matches its name) and read to its
    device under ``device_map``, one at a time."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        for name in f.keys():
            t = f.get_tensor(name)
            if dtype is not None and t.is_floating_point():
                t = t.to(_load_dtype(name, dtype, fp32))
            out[name] = t.to(_placed_device(name, device_map))
    return out


def dispatch_compressed(model: nn.Module, device_map: Mapping[str, Any], offload_folder: str | os.PathLike | None = None) -> nn.Module:
    """Hook ``model`` onto its devices with accelerate: modules mapped to ``"cpu"`` or ``"disk"`` (which needs
    ``offload_folder``) are offloaded and run on the first other device; tensors already on their device stay."""
    from accelerate import dispatch_model

    return dispatch_model(model, device_map=dict(device_map), offload_dir=None if offload_folder is None else str(offload_folder))


# -- the decomposition cache ---------------------------------------------------------------------


def _resolve_local_folder(model_id: str, commit: str | None) -> Path | None:
    """The local folder of a model: a folder, or a Hub id (``org/name``, then any subfolder) in the Hub cache."""
    p = Path(model_id).expanduser()
    if p.is_dir():
        return p.resolve()
    parts = model_id.split("/")
    cut = 1 if len(parts) == 1 else 2  # "gpt2" or "org/name"
    repo, subfolder = "/".join(parts[:cut]), "/".join(parts[cut:])
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(repo, revision=commit or None, local_files_only=True)) / subfolder
    except Exception:
        return None  # not a local folder and not in the hub cache: no cache key can be made
    return folder if folder.is_dir() else None


# The first and last 32 values of each weight: a merged delta or adapter changes every value,
# so two runs catch it. Each further run in the middle is a page fault on a memory-mapped
# weight (~6 us here, 210 weights in SmolLM2: 10 % of a warm cache hit at 4 runs); the ends
# were already touched by the load.
SAMPLE_RUNS, SAMPLE_RUN = 2, 32


def _weight_sample(weight: torch.Tensor) -> bytes | torch.Tensor:
    """A cheap fingerprint of a loaded weight: SAMPLE_RUNS runs of SAMPLE_RUN values spread over it.

    Catches weights that differ from the files without hashing every byte of the model on
    each run. The weights are usually memory-mapped and never read otherwise, so each
    touched page is a page fault: 4k strided values touched thousands (0.5 ms per weight).
    A weight in host memory whose elements lie in order (row-major, or Conv1D's W^T) is read
    as raw bytes at its data pointer: ~1 us against ~12 us for a strided view and its copy,
    over hundreds of weights. Elsewhere (a GPU), one strided view per weight, copied to the
    host by :func:`_sample_digest`. Both give the same bytes.
    """
    w = weight.detach()
    flat = w if w.is_contiguous() or w.dim() != 2 else w.mT  # Conv1D's W^T: no full copy
    n = flat.numel()
    run = min(SAMPLE_RUN, n)
    step = (n - run) // (SAMPLE_RUNS - 1)
    if flat.device.type == "cpu" and flat.is_contiguous() and not flat.is_meta:
        size, ptr = flat.element_size(), flat.data_ptr()
        return b"".join(ctypes.string_at(ptr + i * step * size, run * size) for i in range(SAMPLE_RUNS))
    return flat.reshape(-1).as_strided((SAMPLE_RUNS, run), (step, 1)).reshape(-1)


def _sample_digest(samples: list[tuple[str, list[bytes | torch.Tensor]]]) -> str:
    """sha256 over the target paths and their samples' bytes (samples on a device copied to the host)."""
    h = hashlib.sha256()
    for path, ts in samples:
        h.update(f"{path}\0{len(ts)}\0".encode())
    h.update(b"".join(t if isinstance(t, bytes) else t.view(torch.uint8).cpu().numpy().tobytes() for _, ts in samples for t in ts))
    return h.hexdigest()


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32}


def _map_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a safetensors file as a view of one private memory map, and its metadata.

    safetensors' ``get_tensor`` costs ~30 us a tensor; a cache entry holds hundreds, which made
    reading it a third of a warm cache hit. The format is an 8-byte header length, a JSON
    header (dtype, shape, data_offsets), then the data. Private mapping: writes to the
    parameters (e.g. healing) never reach the file. Unusual files use safetensors itself.
    """
    size = path.stat().st_size
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if not 0 < n <= size - 8:
            raise ValueError("bad header length")
        header = json.loads(fh.read(n))
    meta = dict(header.pop("__metadata__", None) or {})
    base = 8 + n
    spans = {}
    for name, info in header.items():
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        start, end = info["data_offsets"]
        if dtype is None or (base + start) % dtype.itemsize:
            from safetensors.torch import load_file  # a dtype not listed, or data not aligned to it

            return load_file(str(path)), meta
        if not 0 <= start <= end <= size - base or end - start != math.prod(info["shape"]) * dtype.itemsize:
            raise ValueError(f"{name}: data out of bounds")
        spans[name] = (dtype, (base + start) // dtype.itemsize, info["shape"])
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
    return {name: torch.empty(0, dtype=dt).set_(storage, off, shape) for name, (dt, off, shape) in spans.items()}, meta


class DecompositionCache:
    """Factors of decompose-on-load runs, keyed by source weights + exact configuration."""

    def __init__(self, root: str | os.PathLike, source: str, model_id: str) -> None:
        self.root = Path(root)
        self.source = source
        self.model_id = model_id
        self._pending: dict[int, tuple[str, dict[str, int]]] = {}

    @classmethod
    def for_model(cls, model: nn.Module, model_id: str, root: str | os.PathLike | None = None) -> DecompositionCache | None:
        """A cache for ``model`` loaded from ``model_id``; None when its files cannot be found locally."""
        folder = _resolve_local_folder(model_id, getattr(getattr(model, "config", None), "_commit_hash", None))
        if folder is None:
            return None
        root = Path(root) if root is not None else _cache_dir()
        try:
            digest = source_digest(folder, FileHashIndex(root / "file_hashes.json"))
        except OSError:
            return None
        if digest is None:
            return None
        return cls(root, digest, model_id)

    def entry_path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def key(self, model: nn.Module, spec: Any, plan: Any, modules: Mapping[str, nn.Module] | None = None, calibration: str | None = None) -> str:
        """``calibration``: the digest of a data-aware method's calibration tokens (calibration.tokens_digest) and of
        any peft adapters (calibration.peft_adapter_digest), which its factors follow as much as the weights: another
        data folder, file, tokenizer or adapter must miss."""
        modules = modules if modules is not None else dict(model.named_modules())
        dtypes, devices = set(), set()
        samples: list[tuple[str, list[torch.Tensor]]] = []
        for t in plan.targets:
            w, b = _dense_of(modules, t)
            dtypes.add(str(w.dtype))
            devices.add(w.device.type)
            samples.append((t.path, [_weight_sample(w)] + ([_weight_sample(b)] if b is not None else [])))
        spec_d = spec.effective().to_dict()  # an argument that changes nothing must not miss
        payload = {
            "cache_format": CACHE_FORMAT_VERSION,
            "algorithms": ALGORITHM_VERSION,
            "package_version": __version__,
            "torch": torch.__version__.split("+")[0],
            "source": self.source,
            "loaded_sample": _sample_digest(samples),
            "spec": {k: spec_d.get(k) for k in _FACTOR_FIELDS},
            "layout": plan.layout,
            "ranks": sorted(plan.ranks().items()),
            "dtypes": sorted(dtypes),
            "devices": sorted(devices),
        }
        if calibration is not None:  # absent for data-free methods, so their keys are those of before
            payload["calibration_tokens"] = calibration
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def _plan(self, model: nn.Module, spec: Any, adapter: Any, ranks: dict[str, int] | None) -> Any:
        from .plan import make_plan

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # decompose_model repeats make_plan's warnings on a miss
            return make_plan(spec, model.config, adapter=adapter, ranks=ranks)

    def info(self, key: str | None, hit: bool, **extra: Any) -> dict[str, Any]:
        return {"enabled": True, "hit": hit, "key": key, "path": None if key is None else str(self.entry_path(key)), **extra}

    def try_load(self, model: nn.Module, spec: Any, adapter: Any = None, ranks: dict[str, int] | None = None, calibration: str | None = None) -> Any:
        """Put cached factors into ``model`` and return the report; None on a miss (nothing changed)."""
        from .architectures import adapter_for_model
        from .decompose import DecompositionReport, count_parameters

        start = time.perf_counter()
        adapter = adapter or adapter_for_model(model)
        plan = self._plan(model, spec, adapter, ranks)
        if not plan.targets:
            return None
        modules = dict(model.named_modules())  # one walk; get_submodule per target cost ~0.1 ms each
        key = self.key(model, spec, plan, modules, calibration)
        self._pending[id(model)] = (key, plan.ranks())
        path = self.entry_path(key)
        if not path.is_file():
            return None
        try:
            tensors, stored = self._read_entry(path, key, plan)
        except CheckpointError as exc:
            warnings.warn(f"decomposition cache entry {path} is unusable ({exc}); recomputing it", stacklevel=2)
            return None
        params_before = count_parameters(model)
        removed = added = 0
        for t in plan.targets:
            # The read tensors become the parameters (moved only if the model lives elsewhere):
            # no second copy of the factors. _read_entry checked every shape, so the module is
            # built directly (from_parameters would check them again, ~5 us a module).
            factors = {k: tensors[f"{t.path}.{k}"] for k in FACTOR_NAMES if f"{t.path}.{k}" in tensors}
            if t.experts:  # the factors of a stacked expert projection, in place of its 3-D parameter
                w, _ = _dense_of(modules, t)
                if w.device.type != "cpu":
                    factors = {k: v.to(w.device) for k, v in factors.items()}
                owner = modules[t.path.rpartition(".")[0]]
                removed += w.numel()
                added += sum(f.numel() for f in factors.values())
                info = {"in_features": t.in_features, "out_features": t.out_features, "rank": t.rank, "layout": plan.layout, "experts": t.experts, "transposed": bool(owner.is_transposed)}
                _install_factors(model, t.path, info, factors, requires_grad=w.requires_grad)
                del w
                continue
            mod_path = t.path
            old = modules[mod_path]
            if hasattr(old, "base_layer"):
                mod_path, old = f"{mod_path}.base_layer", old.base_layer
            w = old.weight
            if w.device.type != "cpu":
                factors = {k: v.to(w.device) for k, v in factors.items()}
            new = LowRankLinear(t.in_features, t.out_features, t.rank, layout=plan.layout, parameters=factors, requires_grad=w.requires_grad)
            removed += w.numel() + (old.bias.numel() if getattr(old, "bias", None) is not None else 0)
            added += sum(f.numel() for f in factors.values())
            parent_path, _, leaf = mod_path.rpartition(".")
            setattr(modules[parent_path] if parent_path else model, leaf, new)
            del old, w
        # Decoder projections are never tied, so the count follows without another walk.
        report = DecompositionReport(spec, plan, params_before, params_before - removed + added, time.perf_counter() - start, stored.get("solvers") or {})
        report.calibration = stored.get("calibration")
        report.sv_error_bound, report.sv_error_bound_modules = stored.get("sv_error_bound"), int(stored.get("sv_error_bound_modules") or 0)
        report.cache = self.info(key, True, original_decomposition_seconds=stored.get("decomposition_seconds"))
        self._pending.pop(id(model), None)
        return report

    def _read_entry(self, path: Path, key: str, plan: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """(the factors, the stored report), everything checked before any module is replaced."""
        try:
            tensors, meta = _map_safetensors(path)
        except Exception as exc:
            raise CheckpointError(f"unreadable or truncated: {type(exc).__name__}") from None
        if meta.get("key") != key:
            raise CheckpointError("its key does not match its file name")
        if not self._verified(path, meta.get("sha256"), tensors):
            raise CheckpointError("sha256 mismatch: the file is corrupted")
        text = meta.get("report", "{}")
        digest = meta.get("report_sha256")  # entries written before it was kept have none
        if digest is not None and hashlib.sha256(text.encode("utf-8")).hexdigest() != digest:
            raise CheckpointError("its report's sha256 does not match: the file is corrupted")
        try:
            stored = json.loads(text)
        except ValueError:
            raise CheckpointError("its report is not valid JSON: the file is corrupted") from None
        if not isinstance(stored, dict):
            raise CheckpointError("its report is not a JSON object: the file is corrupted")
        for t in plan.targets:
            info = {"rank": t.rank, "in_features": t.in_features, "out_features": t.out_features, "layout": plan.layout, "bias": f"{t.path}.bias" in tensors, "experts": t.experts}
            for name, shape in _expected_factor_shapes(t.path, info).items():
                if name not in tensors or tuple(tensors[name].shape) != shape:
                    raise CheckpointError(f"{name} is missing or has the wrong shape")
        return tensors, stored

    def _verified(self, path: Path, digest: str | None, tensors: Mapping[str, torch.Tensor]) -> bool:
        """Whether ``tensors`` match ``digest``; hashed once per file version, then memoised.

        Like the source weights (:class:`FileHashIndex`), a verified entry is remembered by its
        (size, mtime_ns, inode) stamp: a rewritten or truncated file changes it and is hashed
        again. Hashing every hit cost ~0.12 s for SmolLM2 at rank 64 on all layers, half of
        a warm dense load.
        """
        try:
            st = path.stat()
            stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
            known = json.loads((self.root / "verified.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            stamp, known = None, {}
        if stamp is not None and isinstance(known, dict) and known.get(path.name) == {"stamp": stamp, "sha256": digest}:
            return True
        if digest is None or _tensor_digest(tensors) != digest:
            return False
        self._remember_verified(path, digest)
        return True

    def _remember_verified(self, path: Path, digest: str) -> None:
        index = self.root / "verified.json"
        try:
            st = path.stat()
            with _file_lock(index.with_name(index.name + ".lock")):
                try:
                    known = json.loads(index.read_text(encoding="utf-8"))
                except (OSError, ValueError):
                    known = {}
                known = known if isinstance(known, dict) else {}
                known[path.name] = {"stamp": [st.st_size, st.st_mtime_ns, st.st_ino], "sha256": digest}
                atomic_write_text(index, json.dumps(known, sort_keys=True))
        except OSError:  # a read-only cache only costs a re-hash next time
            pass

    def store(self, model: nn.Module, report: Any) -> Path | None:
        """Save the factors ``report`` describes; sets ``report.cache``. Failures only warn."""
        if report.cache and report.cache.get("hit"):
            return None
        pending = self._pending.pop(id(model), None)
        if pending is None or pending[1] != report.plan.ranks():
            report.cache = {"enabled": True, "hit": False, "key": None, "path": None, "stored": False}
            return None  # try_load was not asked first, so the dense weights were never fingerprinted
        key, _ = pending
        path = self.entry_path(key)
        report.cache = self.info(key, False, stored=False)
        tensors: dict[str, torch.Tensor] = {}
        for t in report.plan.targets:
            mod = model.get_submodule(t.path)
            mod = getattr(mod, "base_layer", mod)
            if not isinstance(mod, LowRankExpertWeights if t.experts else LowRankLinear):
                return None
            for k in FACTOR_NAMES:
                p = getattr(mod, k, None)  # expert factors have no bias
                if p is not None:
                    tensors[f"{t.path}.{k}"] = p.detach().to("cpu").contiguous()
        rep = report.to_dict()
        rep.pop("cache", None)
        text = json.dumps(rep, default=str)
        meta = {"key": key, "sha256": _tensor_digest(tensors), "model_id": str(self.model_id), "report": text, "report_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}
        try:
            _save_tensors(tensors, path, metadata=meta)  # temp file + os.replace: last complete writer wins
        except OSError as exc:
            warnings.warn(f"could not write decomposition cache entry {path}: {exc}", stacklevel=2)
            return None
        self._remember_verified(path, meta["sha256"])  # written from these very tensors
        report.cache["stored"] = True
        return path


def _dense_of(modules: Mapping[str, nn.Module], t: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The dense weight (and bias) a plan target names, before it is replaced."""
    from .modules import dense_weight_of

    if t.experts:  # the path names the stacked parameter itself; its biases stay dense on the module
        owner, _, name = t.path.rpartition(".")
        return getattr(modules[owner], name), None
    mod = modules[t.path]
    return dense_weight_of(getattr(mod, "base_layer", mod))


def cache_info_disabled(reason: str) -> dict[str, Any]:
    """The ``report.cache`` block when the cache is off (``cache=false``) or unavailable."""
    return {"enabled": False, "hit": False, "key": None, "path": None, "reason": reason}
