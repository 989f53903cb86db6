"""Decomposition methods as pure tensor functions (no nn.Module, no I/O).

Every method maps a weight W (out x in) plus optional calibration statistics to
:class:`Factors` with W ~= left @ core @ right.T. The module layer
(:mod:`lm_eval_lowrank.modules`) turns factors into a replacement for ``nn.Linear``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

# Bumped whenever a method or solver computes different factors for the same input, so that the
# decomposition cache never hands back what a fresh run would no longer compute.
# 2: Krylov stops on a residual certificate; whiten builds its factors from U alone.
# 3: rom takes its principal directions from the truncated solvers on W S (S a Cholesky factor).
# 4: Krylov checks its certificate from 3 blocks on (a stop at 2 blocks became one at 3).
# 5: calibrated methods on architectures without an adapter are staged in forward order (were one stage).
# 6: Krylov's certificate also takes Kato-Temple's gap bound (it stops earlier where the top values stand apart).
# 7: no round-off mask in Krylov's certificate, a near-exhausted block orthogonalised again, a value repeated past
#    the block width not certified; Gram zeroes no value (it hands the matrix to the exact SVD instead).
ALGORITHM_VERSION = 7


@dataclass
class Factors:
    left: torch.Tensor  # U1: out x r
    core: torch.Tensor  # r x r
    right: torch.Tensor  # U2: in x r
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return self.core.shape[0]

    def dense(self) -> torch.Tensor:
        return self.left @ self.core @ self.right.mT


@dataclass
class LayerStats:
    """Calibration statistics of one linear's input: X^T X / N over N tokens (in x in).

    ``cross_cov`` (optional) is X^T X_ref / N, where X_ref are the same linear's inputs in
    the dense model on the same tokens: methods that use it fit the dense model's outputs
    X_ref W^T instead of X W^T. None means X_ref = X.

    ``input_abs_mean`` (optional) is the mean |x_j| of each input channel over the N tokens (asvd's scale).

    ``output_fisher`` (optional; fwsvd's and fwhiten's) is the Fisher information of each output row, sum_j E[(dL/dW_ij)^2]
    over the calibration sequences. Statistics from gradients alone hold no ``input_cov`` (None).
    """

    input_cov: torch.Tensor | None
    tokens: int
    cross_cov: torch.Tensor | None = None
    input_abs_mean: torch.Tensor | None = None
    output_fisher: torch.Tensor | None = None
    # Factorisations of input_cov, kept with the statistics: q, k and v (gate and up) share one
    # LayerStats, so its Cholesky is computed once for them (see methods.covariance.factor_of).
    derived: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)


def with_output_fisher(stats: Mapping[str, Any], fisher: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Each entry of ``stats`` (a list per expert for stacked experts) with its rows' Fisher sums, as a copy:
    modules that share inputs share one entry, but not their outputs. An expert without inputs or without a
    gradient gets None (solved data-free)."""
    out: dict[str, Any] = {}
    for p, s in stats.items():
        f = fisher.get(p)
        if isinstance(s, list):
            rows = list(f) if f is not None else [None] * len(s)
            out[p] = [None if se is None or fe is None or float(fe.max()) <= 0 else replace(se, output_fisher=fe) for se, fe in zip(s, rows)]
        else:
            out[p] = s if f is None else replace(s, output_fisher=f)
    return out


# name -> fn(weight, rank, stats, **options) -> Factors
MethodFn = Callable[..., Factors]
_REGISTRY: dict[str, MethodFn] = {}
NEEDS_CALIBRATION: set[str] = set()
USES_REFERENCE: set[str] = set()  # methods that use LayerStats.cross_cov


def register_method(name: str, needs_calibration: bool = False, uses_reference: bool = False) -> Callable[[MethodFn], MethodFn]:
    def deco(fn: MethodFn) -> MethodFn:
        _REGISTRY[name] = fn
        if needs_calibration:
            NEEDS_CALIBRATION.add(name)
        if uses_reference:
            USES_REFERENCE.add(name)
        return fn

    return deco


def get_method(name: str) -> MethodFn:
    _load_builtin()
    if name not in _REGISTRY:
        raise ValueError(f"method={name!r} is invalid: valid methods: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def needs_calibration(name: str) -> bool:
    _load_builtin()
    return name in NEEDS_CALIBRATION


def uses_reference(name: str) -> bool:
    """Whether the method fits the dense model's outputs when given ``LayerStats.cross_cov``."""
    _load_builtin()
    return name in USES_REFERENCE


BUILTIN_MODULES = ("tucker", "rom", "whiten", "asvd", "fwsvd", "fwhiten")


def _load_builtin() -> None:
    # Each method module registers itself on import; modules not present are skipped.
    import importlib
    import importlib.util

    for name in BUILTIN_MODULES:
        if importlib.util.find_spec(f"{__name__}.{name}") is not None:
            importlib.import_module(f"{__name__}.{name}")
