"""Half-precision linears with gradients, on CPUs that multiply half precision slowly.

A linear's backward forms its input's gradient as ``g @ W``, both operands row-major. On a CPU without native
bf16/fp16 GEMM (AVX2; no AVX-512 BF16 or AMX) torch runs that layout through a slow path. Measured on this
project's machine, a 256-token gradient through one 11008x4096 matrix took 82 s in bf16 against 0.24 s cast to
fp32 (0.9 s column-major), and SmolLM2's gradient pass over 4 x 128 tokens took 88 s in bf16 against 2.5 s in fp32.
The forward's ``x @ W^T`` is not as slow (6x fp32's time at 256 tokens), which is why evaluation never showed it.

:func:`linears_in_fp32` forms every such linear and its gradients in fp32, rounded to the half dtype where a
half-precision GEMM rounds (it accumulates in fp32 and rounds once): the same values up to the order of the fp32
sums. It is for passes that take gradients (the Fisher pass); evaluation keeps the model's own kernels.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

HALF_DTYPES = (torch.bfloat16, torch.float16)
_SLOW: dict[torch.dtype, bool] = {}  # dtype -> whether this CPU's half-precision g @ W loses to fp32


def slow_half_products(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies ``dtype`` matrices in the backward's layout (both row-major) slower than it
    casts them to fp32 and multiplies there. Measured once per dtype and process, on a 64x512 @ 512x512 product
    (tens of ms at most)."""
    if dtype not in HALF_DTYPES:
        return False
    if dtype not in _SLOW:
        gen = torch.Generator().manual_seed(0)
        g, w = torch.randn(64, 512, generator=gen).to(dtype), torch.randn(512, 512, generator=gen).to(dtype)

        def best(f: Any) -> float:
            f()  # warm-up
            times = []
            for _ in range(3):
                start = time.perf_counter()
                f()
                times.append(time.perf_counter() - start)
            return min(times)

        _SLOW[dtype] = best(lambda: (g.float() @ w.float()).to(dtype)) < best(lambda: g @ w)
    return _SLOW[dtype]


def slow_half_products_on(t: torch.Tensor) -> bool:
    """Whether products with ``t`` are better formed in fp32: a half-precision tensor on a CPU that is slow at them."""
    return t.device.type == "cpu" and slow_half_products(t.dtype)


class _LinearInFp32(torch.autograd.Function):
    """F.linear and its gradients formed in fp32, each rounded to the inputs' dtype."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # x only when the weight takes a gradient, as autograd's own linear saves it
        ctx.save_for_backward(x if weight.requires_grad else None, weight)
        return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        g32 = g.float()  # cast once; the Fisher pass needs grad_x alone (its weights take no gradient)
        rows = g32.reshape(-1, g.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (g32 @ weight.float()).to(g.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = (rows.mT @ x.reshape(-1, x.shape[-1]).float()).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = rows.sum(0).to(g.dtype)
        return grad_x, grad_w, grad_b


class _LinearsInFp32Mode(TorchFunctionMode):
    """Sends F.linear calls that take a gradient on the CPU in one of ``dtypes`` through _LinearInFp32."""

    def __init__(self, dtypes: set[torch.dtype]) -> None:
        super().__init__()
        self.dtypes = dtypes

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear and torch.is_grad_enabled():
            x, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if x.device.type == "cpu" and weight.dtype in self.dtypes and (x.requires_grad or weight.requires_grad):
                return _LinearInFp32.apply(x, weight, bias)
        return func(*args, **kwargs)


@contextmanager
def linears_in_fp32(model: torch.nn.Module) -> Iterator[bool]:
    """Within it, every ``F.linear`` that takes a gradient on the CPU, in a half dtype this CPU multiplies slowly
    (slow_half_products), runs in fp32 forward and backward: nn.Linear, stacked experts and factored modules alike.
    Yields whether it applies to ``model`` (not on a GPU, in fp32, or on a CPU with fast half-precision GEMM)."""
    dtypes = {d for d in {p.dtype for p in model.parameters() if p.device.type == "cpu"} if slow_half_products(d)}
    if not dtypes:
        yield False
        return
    with _LinearsInFp32Mode(dtypes):
        yield True
