"""The module that replaces a decomposed ``nn.Linear`` (or GPT-2 ``Conv1D``).

Two layouts of the same factors W ~= U1 @ core @ U2^T:

- ``tucker`` (three factors, r(in+out)+r^2 parameters): x -> U2^T -> core -> U1 (+ bias);
- ``folded`` (two factors, r(in+out)): the core is multiplied into the factors at load
  (split as sqrt when diagonal, which keeps fp16/bf16 ranges balanced): two GEMMs.

Weights are stored like ``nn.Linear`` weights (out x in per stage), so ``F.linear`` runs
on them without transposes. The state-dict keys are ``first``, ``core`` (tucker only),
``last`` and ``bias``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from .methods import Factors

LAYOUTS = ("folded", "tucker")
FACTOR_NAMES = ("first", "core", "last", "bias")


def factor_shapes(in_features: int, out_features: int, rank: int, layout: str = "folded", bias: bool = False) -> dict[str, tuple[int, ...]]:
    """The shape of each factor a LowRankLinear of this size holds (the one rule, for checks of stored factors)."""
    shapes: dict[str, tuple[int, ...]] = {"first": (rank, in_features), "last": (out_features, rank)}
    if layout == "tucker":
        shapes["core"] = (rank, rank)
    if bias:
        shapes["bias"] = (out_features,)
    return shapes


class LowRankLinear(nn.Module):
    """y = U1 (core (U2^T x)) + b, or the folded two-GEMM form of it."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        layout: str = "folded",
        bias: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        *,
        parameters: Mapping[str, torch.Tensor] | None = None,
        requires_grad: bool = True,
    ) -> None:
        """Empty factors of the given shape, or ``parameters`` (first/core/last/bias) used as they are."""
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout={layout!r} is invalid: valid {', '.join(LAYOUTS)}")
        # The instance and parameter dicts directly: a cache hit builds hundreds of these modules,
        # and Module.__setattr__ per attribute (plus placeholder tensors) was most of that surgery.
        self.__dict__.update(in_features=in_features, out_features=out_features, rank=rank, layout=layout)
        if parameters is None:
            kw = {"dtype": dtype, "device": device}
            parameters = {
                "first": torch.empty(rank, in_features, **kw),
                "core": torch.empty(rank, rank, **kw) if layout == "tucker" else None,
                "last": torch.empty(out_features, rank, **kw),
                "bias": torch.zeros(out_features, **kw) if bias else None,
            }
        self._parameters.update({k: None if parameters.get(k) is None else nn.Parameter(parameters[k], requires_grad=requires_grad) for k in FACTOR_NAMES})

    # -- construction -------------------------------------------------------------
    @classmethod
    def from_parameters(
        cls,
        tensors: dict[str, torch.Tensor],
        in_features: int,
        out_features: int,
        layout: str = "folded",
        requires_grad: bool = True,
    ) -> LowRankLinear:
        """A module whose parameters *are* ``tensors`` (keys first/core/last/bias), without copying.

        Shapes are checked before anything is built; no placeholder is allocated.
        """
        if layout not in LAYOUTS:
            raise ValueError(f"layout={layout!r} is invalid: valid {', '.join(LAYOUTS)}")
        first = tensors.get("first")
        rank = first.shape[0] if first is not None and first.dim() == 2 else 0
        expected = factor_shapes(in_features, out_features, rank, layout, bias="bias" in tensors)
        for k, t in tensors.items():
            shape = expected.get(k)
            if shape is None or tuple(t.shape) != shape:
                raise ValueError(f"LowRankLinear.{k}: shape {tuple(t.shape)} does not fit a {layout} rank-{rank} {out_features}x{in_features} module")
        missing = [k for k in expected if k not in tensors]
        if missing:
            raise ValueError(f"LowRankLinear: no tensor for {', '.join(missing)}")
        return cls(in_features, out_features, rank, layout=layout, parameters=tensors, requires_grad=requires_grad)

    @classmethod
    def from_factors(
        cls,
        factors: Factors,
        bias: torch.Tensor | None,
        layout: str = "folded",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> LowRankLinear:
        U1, core, U2 = factors.left, factors.core, factors.right
        out_f, r = U1.shape
        in_f = U2.shape[0]
        dtype = dtype or U1.dtype
        device = device if device is not None else U1.device
        mod = cls(in_f, out_f, r, layout=layout, bias=bias is not None, dtype=dtype, device=device)
        with torch.no_grad():
            if layout == "tucker":
                first, last = U2.mT, U1
                mod.core.copy_(core)
            else:
                d = torch.diagonal(core)
                if torch.count_nonzero(core - torch.diag(d)) == 0 and bool((d >= 0).all()):
                    s = d.sqrt()
                    first, last = s[:, None] * U2.mT, U1 * s[None, :]
                else:
                    first, last = core @ U2.mT, U1
            mod.first.copy_(first)
            mod.last.copy_(last)
            if bias is not None:
                mod.bias.copy_(bias)
        return mod

    # -- views --------------------------------------------------------------------
    @property
    def weight(self) -> torch.Tensor:
        """The dense weight (out x in) these factors represent, for code that reads ``.weight``."""
        return self.dense_weight()

    def dense_weight(self) -> torch.Tensor:
        mid = self.first if self.core is None else self.core @ self.first
        return self.last @ mid

    def num_parameters(self, include_bias: bool = False) -> int:
        n = self.first.numel() + self.last.numel() + (self.core.numel() if self.core is not None else 0)
        return n + (self.bias.numel() if include_bias and self.bias is not None else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.first)
        if self.core is not None:
            h = F.linear(h, self.core)
        return F.linear(h, self.last, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, layout={self.layout}, bias={self.bias is not None}"


def dense_weight_of(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W as out x in, bias) of an ``nn.Linear`` or a GPT-2 style ``Conv1D`` (weight in x out)."""
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.weight.mT, module.bias
    raise TypeError(f"cannot decompose a {type(module).__name__}: expected nn.Linear or Conv1D")
