"""lm-eval-lowrank: low-rank decomposition on load for lm-evaluation-harness.

Kept import-light on purpose: this module is imported at interpreter start by the
registration hook, so it must not import torch, transformers or lm_eval.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "load_compressed", "compress_model"]


def __getattr__(name: str):
    # Lazy: importing the package (done at interpreter start by the hook) must not import torch.
    if name == "load_compressed":
        from .checkpoint import load_compressed

        return load_compressed
    if name == "compress_model":
        from .api import compress_model

        return compress_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
