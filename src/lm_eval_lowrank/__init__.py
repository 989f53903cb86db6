"""lm-eval-lowrank: low-rank decomposition on load for lm-evaluation-harness.

Kept import-light on purpose: this module is imported at interpreter start by the
registration hook, so it must not import torch, transformers or lm_eval.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
