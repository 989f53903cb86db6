"""Registers ``hf-tucker`` with lm-eval the moment lm-eval's registry is imported.

lm-eval 0.4.13 scans no entry points, so a ``.pth`` file imports this module at
interpreter start. It only installs a post-import hook (no torch, no lm_eval import),
so a process that never touches lm-eval pays a few microseconds.

The trap it avoids: ``get_model`` imports the built-in models only while the registry
is empty. Registering ``hf-tucker`` first would hide ``hf``; so the hook imports
``lm_eval.models`` (placeholders only, cheap) before adding ours.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys

_TARGET = "lm_eval.api.registry"
MODEL_NAME = "hf-tucker"
MODEL_PATH = "lm_eval_lowrank.harness:HFTuckerLM"


def register(registry_module=None) -> None:
    """Add the lazy ``hf-tucker`` placeholder to lm-eval's model registry (idempotent)."""
    if registry_module is None:
        import lm_eval.api.registry as registry_module
    import lm_eval.models  # noqa: F401  fills the registry with the built-in placeholders first

    registry = registry_module.model_registry
    if MODEL_NAME not in registry:
        registry.register(MODEL_NAME, target=MODEL_PATH)


class _Loader(importlib.abc.Loader):
    def __init__(self, wrapped: importlib.abc.Loader) -> None:
        self._wrapped = wrapped

    def create_module(self, spec):
        return self._wrapped.create_module(spec)

    def exec_module(self, module) -> None:
        self._wrapped.exec_module(module)
        try:
            register(module)
        except Exception as exc:  # never break lm-eval itself
            print(f"lm-eval-lowrank: could not register {MODEL_NAME}: {exc}", file=sys.stderr)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader)
                return spec
        return None


def install() -> None:
    if any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    if _TARGET in sys.modules:  # imported before us (unusual): register directly
        try:
            register(sys.modules[_TARGET])
        except Exception:
            pass
        return
    sys.meta_path.insert(0, _Finder())


install()
