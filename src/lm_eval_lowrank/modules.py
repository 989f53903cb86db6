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

import functools
import types
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .methods import Factors

LAYOUTS = ("folded", "tucker")
FACTOR_NAMES = ("first", "core", "last", "bias")


def factor_shapes(in_features: int, out_features: int, rank: int, layout: str = "folded", bias: bool = False, experts: int = 0) -> dict[str, tuple[int, ...]]:
    """The shape of each factor a LowRankLinear of this size holds, or with ``experts`` a LowRankExpertWeights
    (each shape led by the number of experts; biases stay on the experts module): the one rule, for checks of
    stored factors."""
    shapes: dict[str, tuple[int, ...]] = {"first": (rank, in_features), "last": (out_features, rank)}
    if layout == "tucker":
        shapes["core"] = (rank, rank)
    if experts:
        return {k: (experts, *v) for k, v in shapes.items()}
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


# -- mixture-of-experts weights ------------------------------------------------------------------------------
#
# transformers 5 stores the experts of an MoE block (Mixtral, Qwen-MoE, OLMoE, GPT-OSS, DeepSeek, ...) as 3-D
# parameters of one module, e.g. ``gate_up_proj`` (experts x out x in; in x out where the module says
# ``is_transposed``). Decomposing one replaces the parameter by a LowRankExpertWeights child of the same name
# (each expert's matrix as its own rank-r factors), and the experts module's class by a subclass whose forward
# multiplies by the factors. Every other part of the module (gating, activation, biases, norms) is its own.


def _row_major(t: torch.Tensor) -> torch.Tensor:
    # strides exactly as torch.empty gives them (.contiguous() keeps a size-1 dim's stride as it is)
    if t.stride() == torch.empty(t.shape, device="meta").stride():
        return t
    return torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)


def _expert_factor_layout(name: str, t: torch.Tensor) -> torch.Tensor:
    """A stacked factor in the memory layout LowRankExpertWeights holds it in (``last``: a transposed view)."""
    return _row_major(t.mT).mT if name == "last" else _row_major(t)


class ExpertFactors(NamedTuple):
    """The factors of one stacked expert projection as the experts forward reads them: what calling a
    :class:`LowRankExpertWeights` returns, after any hook on it (accelerate's CPU/disk offload) has put them
    where the forward runs."""

    first: torch.Tensor
    core: torch.Tensor | None
    last: torch.Tensor

    def linear(self, x: torch.Tensor, expert: int | torch.Tensor) -> torch.Tensor:
        """x @ W[expert]^T, through the factors (two or three thin GEMMs)."""
        h = F.linear(x, self.first[expert])
        if self.core is not None:
            h = F.linear(h, self.core[expert])
        return F.linear(h, self.last[expert])

    def grouped_operands(self) -> list[torch.Tensor]:
        """The (E, K, N) right-hand sides of the grouped GEMMs that multiply sorted rows by every expert's W^T, in
        order: views of the factors."""
        return [t.mT for t in (self.first, self.core, self.last) if t is not None]


class LowRankExpertWeights(nn.Module):
    """The per-expert factors of one stacked expert projection: W[e] ~= last[e] (core[e]) first[e].

    ``first`` is (E, r, in), ``core`` (E, r, r) for the tucker layout, ``last`` (E, out, r). Indexing it
    (``w[e]``, ``w[ids]``) gives dense weights in the orientation the original parameter was stored in, so
    code that reads the parameter keeps working.

    ``last`` is held as the transpose of a row-major (E, r, out) tensor: the grouped GEMMs then read
    ``first.mT`` and ``last.mT`` in place at any rank (row-major ``last`` has rows of r elements, which the
    kernel refuses unless they span a multiple of 16 bytes). ``state_dict()`` holds that transposed view, so
    ``last`` needs ``.contiguous()`` before safetensors; the files this package saves are row-major.
    """

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        out_features: int,
        rank: int,
        layout: str = "folded",
        transposed: bool = False,
        *,
        parameters: Mapping[str, torch.Tensor],
        requires_grad: bool = True,
    ) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout={layout!r} is invalid: valid {', '.join(LAYOUTS)}")
        self.__dict__.update(num_experts=num_experts, in_features=in_features, out_features=out_features, rank=rank, layout=layout, transposed=transposed)
        for k in ("first", "core", "last"):
            t = parameters.get(k)
            self._parameters[k] = None if t is None else nn.Parameter(_expert_factor_layout(k, t), requires_grad=requires_grad)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any], *args: Any) -> None:
        if local_metadata.get("assign_to_params_buffers") and prefix + "last" in state_dict:  # assigned, not copied in
            state_dict[prefix + "last"] = _expert_factor_layout("last", state_dict[prefix + "last"])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)

    @classmethod
    def from_factors(
        cls, factors: list[Factors], layout: str = "folded", transposed: bool = False, dtype: torch.dtype | None = None, device: torch.device | str | None = None
    ) -> LowRankExpertWeights:
        """One expert's :class:`Factors` per entry, in expert order; same split of the core as LowRankLinear."""
        firsts, cores, lasts = [], [], []
        for f in factors:
            one = LowRankLinear.from_factors(f, None, layout=layout, dtype=dtype, device=device)
            firsts.append(one.first.data)
            lasts.append(one.last.data)
            if one.core is not None:
                cores.append(one.core.data)
        params = {"first": torch.stack(firsts), "last": torch.stack(lasts), "core": torch.stack(cores) if cores else None}
        out_f, r = params["last"].shape[1:]
        return cls(len(factors), params["first"].shape[2], out_f, r, layout=layout, transposed=transposed, parameters=params)

    @classmethod
    def empty(
        cls, num_experts: int, in_features: int, out_features: int, rank: int, layout: str = "folded", transposed: bool = False, **kw: Any
    ) -> LowRankExpertWeights:
        """Uninitialised factors of this size (``device="meta"`` for a skeleton that a state dict fills)."""
        params = {k: torch.empty(shape, **kw) for k, shape in factor_shapes(in_features, out_features, rank, layout, experts=num_experts).items()}
        return cls(num_experts, in_features, out_features, rank, layout=layout, transposed=transposed, parameters=params)

    @property
    def shape(self) -> torch.Size:
        """The stored shape of the parameter this replaces."""
        e, o, i = self.num_experts, self.out_features, self.in_features
        return torch.Size((e, i, o) if self.transposed else (e, o, i))

    def forward(self) -> ExpertFactors:
        """The factors, for the experts forward. It calls this module rather than reading its parameters, so that
        hooks on it run: accelerate's offload hooks leave them on the meta device between forwards."""
        return ExpertFactors(self.first, self.core, self.last)

    def dense_weight(self) -> torch.Tensor:
        """(E, out, in): every expert's matrix."""
        mid = self.first if self.core is None else self.core @ self.first
        return self.last @ mid

    def __getitem__(self, index: Any) -> torch.Tensor:
        mid = self.first[index] if self.core is None else self.core[index] @ self.first[index]
        w = self.last[index] @ mid
        return w.mT if self.transposed else w

    def num_parameters(self) -> int:
        return sum(p.numel() for p in (self.first, self.core, self.last) if p is not None)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, layout={self.layout}"


def is_experts_module(module: nn.Module) -> bool:
    """A transformers experts module whose forward follows the shared contract (``use_experts_implementation``):
    ``forward(hidden_states, top_k_index, top_k_weights)`` over 3-D ``gate_up_proj``/``up_proj`` and ``down_proj``."""
    return all(hasattr(module, a) for a in ("has_gate", "has_bias", "is_transposed", "num_experts")) and isinstance(
        getattr(module, "down_proj", None), (nn.Parameter, LowRankExpertWeights)
    )


def expert_projection_names(module: nn.Module) -> tuple[str, ...]:
    return ("gate_up_proj" if module.has_gate else "up_proj", "down_proj")


def stacked_expert(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    """(the experts module, the projection's name) for the path of a stacked expert projection."""
    owner, _, name = path.rpartition(".")
    return root.get_submodule(owner), name


def expert_matrices(module: nn.Module, name: str) -> torch.Tensor:
    """Every expert's (out x in) matrix of projection ``name`` (E x out x in): a view of the stored parameter in
    whichever orientation it is stored, or the product of its factors once decomposed."""
    w = getattr(module, name)
    if isinstance(w, LowRankExpertWeights):
        return w.dense_weight()
    return w.mT if module.is_transposed else w


class LowRankExperts:
    """Mixed into an experts module's class once one of its projections is decomposed: the forward of the
    shared contract (route, project, gate, project back, weight, sum), with each projection dense or factored."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        return experts_forward(self, hidden_states, top_k_index, top_k_weights)

    def __reduce_ex__(self, protocol: Any) -> Any:
        # The class is made at run time, so pickle cannot look it up by name: pickle the module as its original
        # class, and mix the factored forward back in on load.
        lowrank, self.__class__ = type(self), type(self).__mro__[2]
        try:
            rebuild, args, *rest = self.__reduce_ex__(protocol)
        finally:
            self.__class__ = lowrank
        return (_rebuild_lowrank_experts, (rebuild, args), *rest)


def projection_weights(module: nn.Module) -> dict[str, torch.Tensor | ExpertFactors]:
    """Each expert projection of ``module`` as its forward reads it: the stacked dense parameter, or the factors
    of a decomposed one, got by calling its :class:`LowRankExpertWeights` so that offload hooks on it run."""
    weights: dict[str, torch.Tensor | ExpertFactors] = {}
    for name in expert_projection_names(module):
        w = getattr(module, name)
        weights[name] = w() if isinstance(w, LowRankExpertWeights) else w
    return weights


def expert_projection(module: nn.Module, name: str, x: torch.Tensor, expert: int, weight: Any = None) -> torch.Tensor:
    """One expert's projection ``name`` of ``x`` (its bias included), through its factors or its dense matrix;
    ``weight`` stands in for the module's own (what :func:`projection_weights` gave, or e.g. the dense matrix a
    decomposed projection replaced)."""
    w = getattr(module, name) if weight is None else weight
    if isinstance(w, LowRankExpertWeights):
        w = w()
    if isinstance(w, ExpertFactors):
        y = w.linear(x, expert)
    else:
        y = F.linear(x, w[expert].mT if module.is_transposed else w[expert])
    if module.has_bias:
        y = y + getattr(module, f"{name}_bias")[expert]
    return y


def routed_pairs(top_k_index: torch.Tensor, num_experts: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(expert, its (token, slot) pairs as indices into the flattened ``top_k_index``) for every expert some
    token was routed to, in expert order. Indices >= num_experts (expert-parallel sentinels) are left out."""
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts + 1).tolist()  # one host sync for the whole block
    start = 0
    for expert, n in enumerate(counts[:num_experts]):
        if n:
            yield expert, order[start : start + n]
        start += n


_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# (device type, dtype) where the grouped forward failed its check against the loop, and why: the loop runs there;
# and those where it passed.
GROUPED_REFUSED: dict[tuple[str, torch.dtype], str] = {}
GROUPED_PASSED: set[tuple[str, torch.dtype]] = set()


def _grouped_mm_layout_ok(t: torch.Tensor) -> bool:
    # The kernels want one unit stride in the last two dims and every other stride (and the start) 16-byte aligned.
    align = 16 // t.element_size()
    strides = list(t.stride())
    unit = -1 if strides[-1] == 1 else -2 if strides[-2] == 1 else None
    if unit is None or t.data_ptr() % 16:
        return False
    del strides[unit]
    return all(s % align == 0 for s in strides)


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` (S, K) sorted by group, group g's rows ending at ``offsets[g]``, times ``weight[g]`` (K, N).

    One grouped GEMM where torch's kernel takes the weight as it lies (``x`` is copied to aligned rows if need
    be: activations are cheap to copy, all experts' weights are not); a loop over the groups otherwise. Rows past
    ``offsets[-1]`` are left unset, as by the kernel.
    """
    if _GROUPED_MM is not None and x.dtype == weight.dtype and x.dtype in _GROUPED_DTYPES and _grouped_mm_layout_ok(weight):
        if not _grouped_mm_layout_ok(x):
            align = 16 // x.element_size()
            padded = x.new_empty(x.shape[0], -(-x.shape[1] // align) * align)[:, : x.shape[1]]
            x = padded.copy_(x)
        return _GROUPED_MM(x, weight, offs=offsets)
    out = x.new_empty(x.shape[0], weight.shape[-1])
    start = 0
    for g, end in enumerate(offsets.tolist()):
        if end > start:
            torch.mm(x[start:end], weight[g], out=out[start:end])
        start = end
    return out


@functools.lru_cache(maxsize=None)  # asked on every experts forward
def grouped_kernel_pays(device: torch.device) -> bool:
    """torch has a grouped GEMM kernel for ``device`` that pays over a loop there: CUDA at SM 8.0+ (on the CPU it
    was not reliably faster: benchmarks/moe.py)."""
    return _GROUPED_MM is not None and device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def use_grouped_experts(module: nn.Module, hidden_states: torch.Tensor, weights: Mapping[str, Any] | None = None) -> bool:
    """Whether an experts forward runs as grouped GEMMs (every expert at once, no host sync) rather than a loop
    over the routed experts (``weights``: the module's :func:`projection_weights`, if the caller has them).

    Where :func:`grouped_kernel_pays`, for inference in the dtypes the kernel takes, unless the model asks for
    ``experts_implementation="eager"``. Training (``heal``) keeps the loop, whose backward every device has.
    """
    if hidden_states.dtype not in _GROUPED_DTYPES or not grouped_kernel_pays(hidden_states.device):
        return False
    if (hidden_states.device.type, hidden_states.dtype) in GROUPED_REFUSED:
        return False
    weights = projection_weights(module) if weights is None else weights
    if not all(_grouped_mm_layout_ok(t) for w in weights.values() for t in _grouped_operands(module, w)):
        return False  # e.g. a tucker core of a rank whose rows are not 16-byte aligned: the loop, not a copy per call
    if torch.is_grad_enabled() and (hidden_states.requires_grad or any(p.requires_grad for p in module.parameters())):
        return False
    return getattr(getattr(module, "config", None), "_experts_implementation", None) != "eager"


def experts_probe(
    module: nn.Module, tokens: int = 6, device: torch.device | None = None, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A few seeded (hidden_states, top_k_index, top_k_weights) for ``module``'s experts contract, where it lies
    (or on ``device`` in ``dtype``): the inputs of the checks that compare two forwards of an experts module."""
    first = next(module.parameters())
    w = torch.empty(0, device=device or first.device, dtype=dtype or first.dtype)
    n, top_k = module.num_experts, min(2, module.num_experts)
    down = module.down_proj
    hidden = down.out_features if isinstance(down, LowRankExpertWeights) else down.shape[-1 if module.is_transposed else -2]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=g).to(dtype=w.dtype, device=w.device)
    index = torch.stack([torch.randperm(n, generator=g)[:top_k] for _ in range(tokens)]).to(w.device)
    weights = torch.softmax(torch.randn(tokens, top_k, generator=g), -1).to(dtype=w.dtype, device=w.device)
    return x, index, weights


def experts_outputs_agree(ours: torch.Tensor, ref: torch.Tensor) -> bool:
    """Two experts forwards' outputs equal up to the rounding of their dtype (half types round per summation order)."""
    tol = 1e-4 if ref.dtype in (torch.float32, torch.float64) else 2e-2
    return ours.shape == ref.shape and torch.allclose(ours.float(), ref.float(), rtol=tol, atol=tol * float(ref.float().abs().max()) + 1e-6)


def check_grouped_experts(module: nn.Module, device: torch.device | None = None, dtype: torch.dtype | None = None) -> str | None:
    """Run the grouped forward once on a few tokens where ``module`` lies (or on ``device`` in ``dtype``), against
    the loop. On an error or a different result the loop is used for that device type and dtype from then on,
    and the reason is returned.

    A guard for kernels this package could not run when it was built (CUDA's), not a per-call cost."""
    probe = experts_probe(module, device=device, dtype=dtype)
    key = (probe[0].device.type, probe[0].dtype)
    try:
        with torch.no_grad():
            agree = experts_outputs_agree(experts_forward(module, *probe, grouped=True), experts_forward(module, *probe, grouped=False))
        reason = None if agree else "its result differs from the loop's"
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as err:  # e.g. a kernel that refuses these shapes on this GPU
        reason = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    if reason is not None:
        GROUPED_REFUSED[key] = reason
    else:
        GROUPED_PASSED.add(key)
    return reason


def grouped_experts_checked(module: nn.Module, hidden_states: torch.Tensor, weights: Mapping[str, Any] | None = None) -> bool:
    """:func:`use_grouped_experts`, and the grouped forward has passed :func:`check_grouped_experts` on this
    device type and dtype: run here, once, if it has not."""
    if not use_grouped_experts(module, hidden_states, weights):
        return False
    if (hidden_states.device.type, hidden_states.dtype) in GROUPED_PASSED:
        return True
    return check_grouped_experts(module, hidden_states.device, hidden_states.dtype) is None


def ensure_grouped_checked(module: nn.Module) -> None:
    """:func:`grouped_experts_checked` where ``module`` lies, before any forward (outside the timed ones).
    Offloaded weights (on the meta device between forwards) are checked by their first forward instead."""
    if any(p.is_meta for p in module.parameters()):
        return
    with torch.no_grad():
        grouped_experts_checked(module, next(module.parameters()).new_empty(0, 0))


def _hook_execution_device(module: nn.Module) -> torch.device | None:
    """The execution device of an accelerate hook on ``module`` itself (device_map dispatch and offload)."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
        if getattr(h, "execution_device", None) is not None:
            return torch.device(h.execution_device)
    return None


def hook_execution_devices(model: nn.Module) -> set[torch.device]:
    """Every device accelerate's hooks run ``model``'s modules on (a module offloaded to the CPU or disk runs on
    one its weights do not lie on)."""
    return {d for m in model.modules() if (d := _hook_execution_device(m)) is not None}


def execution_device(module: nn.Module) -> torch.device:
    """Where ``module``'s forward runs: the execution device of an accelerate hook on it or on its factors
    (device_map offload), else where its weights lie."""
    for m in (module, *module.children()):
        if (d := _hook_execution_device(m)) is not None:
            return d
    return next(module.parameters()).device


def experts_forward_path(model: nn.Module) -> dict[str, Any] | None:
    """How the model's decomposed experts run for inference (None without any), for the results JSON:
    ``{"path": "grouped_gemm" | "loop"}``, what their forwards picked if they have run (``"mixed"`` with the
    count of modules per path if they differ), else what they will pick where they run; ``"grouped_refused"``
    when the grouped forward failed its check there (:func:`check_grouped_experts`)."""
    experts = [m for m in model.modules() if isinstance(m, LowRankExperts)]
    if not experts:
        return None
    ran: dict[str, int] = {}
    for module in experts:
        path = module.__dict__.get("last_experts_path")
        if path is not None:
            ran[path] = ran.get(path, 0) + 1
    first = experts[0]
    ensure_grouped_checked(first)
    device, dtype = execution_device(first), next(first.parameters()).dtype
    if len(ran) > 1:
        out: dict[str, Any] = {"path": "mixed", "modules": dict(sorted(ran.items()))}
    elif ran:
        out = {"path": next(iter(ran))}
    else:
        with torch.no_grad():
            grouped = use_grouped_experts(first, torch.empty(0, 0, device=device, dtype=dtype))
        out = {"path": "grouped_gemm" if grouped else "loop"}
    refused = GROUPED_REFUSED.get((device.type, dtype))
    if refused is not None and out["path"] != "grouped_gemm":
        out["grouped_refused"] = refused
    return out


def experts_forward(
    module: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    grouped: bool | None = None,
    on_projection: Callable[[str, int, torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """The experts contract, reading each projection as it is (dense or factored): as grouped GEMMs over all
    experts or expert by expert (``grouped``; by default :func:`use_grouped_experts` decides).

    Only the experts some token was routed to run; indices >= num_experts (expert-parallel sentinels) are skipped.
    ``on_projection(name, expert, token_idx, x, y)`` sees each projection's input and output, expert by expert (the
    gradient pass pairs them); it implies the loop.
    """
    weights = projection_weights(module)
    if on_projection is not None:
        grouped = False
    if grouped is None:
        # weights that rest elsewhere (offloaded) are checked where they run, at their first forward there
        grouped = grouped_experts_checked(module, hidden_states, weights)
        if isinstance(module, LowRankExperts):
            module.__dict__["last_experts_path"] = "grouped_gemm" if grouped else "loop"  # for the results JSON
    if grouped:
        return _grouped_experts_forward(module, weights, hidden_states, top_k_index, top_k_weights)
    # Sums over a token's experts in fp32 (top-8 models add eight terms), like transformers' grouped forward.
    out = torch.zeros(hidden_states.shape, dtype=torch.promote_types(hidden_states.dtype, torch.float32), device=hidden_states.device)
    top_k = top_k_index.shape[-1]
    up_name, down_name = expert_projection_names(module)
    for expert, pairs in routed_pairs(top_k_index, module.num_experts):
        token_idx = pairs // top_k
        x = hidden_states[token_idx]
        h = expert_projection(module, up_name, x, expert, weights[up_name])
        if on_projection is not None:
            on_projection(up_name, expert, token_idx, x, h)
        x = module._apply_gate(h) if module.has_gate else module.act_fn(h)
        y = expert_projection(module, down_name, x, expert, weights[down_name])
        if on_projection is not None:
            on_projection(down_name, expert, token_idx, x, y)
        if getattr(module, "has_post_expert_norm", False):
            y = module.post_expert_norm(y)
        y = y * top_k_weights.reshape(-1)[pairs, None]
        out.index_add_(0, token_idx, y.to(out.dtype))
    return out.to(hidden_states.dtype)


def _grouped_operands(module: nn.Module, weight: torch.Tensor | ExpertFactors) -> list[torch.Tensor]:
    if isinstance(weight, ExpertFactors):
        return weight.grouped_operands()
    return [weight if module.is_transposed else weight.mT]


def _grouped_projection(
    module: nn.Module, name: str, weight: torch.Tensor | ExpertFactors, x: torch.Tensor, offsets: torch.Tensor, experts: torch.Tensor
) -> torch.Tensor:
    y = x
    for operand in _grouped_operands(module, weight):
        y = grouped_mm(y, operand, offsets)
    if module.has_bias:
        y = y + getattr(module, f"{name}_bias")[experts]
    return y


def _grouped_experts_forward(
    module: nn.Module, weights: Mapping[str, Any], hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    n, top_k = module.num_experts, top_k_index.shape[-1]
    experts, order = torch.sort(top_k_index.reshape(-1), stable=True)
    # histc keeps the counts' shape static (no host sync); ids >= n (sentinels) fall outside it and sort last
    counts = torch.histc(experts.float() if experts.device.type == "cpu" else experts.int(), bins=n, min=0, max=n - 1)
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)
    token_idx = order // top_k
    experts = experts.clamp(max=n - 1)  # in range for the bias lookup; sentinel rows are dropped below
    up_name, down_name = expert_projection_names(module)
    h = _grouped_projection(module, up_name, weights[up_name], hidden_states[token_idx], offsets, experts)
    h = module._apply_gate(h) if module.has_gate else module.act_fn(h)
    y = _grouped_projection(module, down_name, weights[down_name], h, offsets, experts)
    if getattr(module, "has_post_expert_norm", False):
        y = module.post_expert_norm(y)
    # rows past offsets[-1] (sentinels) were never written: zero them rather than weight them (NaN * 0 is NaN)
    routed = (torch.arange(y.shape[0], device=y.device) < offsets[-1])[:, None]
    y = torch.where(routed, y * top_k_weights.reshape(-1)[order, None], 0)
    # Back to (token, slot) order and summed over the slots: deterministic, where index_add_ with repeated
    # tokens is not on CUDA; the sum accumulates in fp32 like transformers' grouped forward.
    unsorted = torch.empty_like(y)
    unsorted[order] = y
    return unsorted.view(*top_k_index.shape, y.shape[-1]).sum(1).to(hidden_states.dtype)  # -1 fails at 0 tokens


_LOWRANK_EXPERT_CLASSES: dict[type, type] = {}


def _lowrank_class(cls: type) -> type:
    sub = _LOWRANK_EXPERT_CLASSES.get(cls)
    if sub is None:
        sub = _LOWRANK_EXPERT_CLASSES[cls] = type(f"LowRank{cls.__name__}", (LowRankExperts, cls), {"__module__": cls.__module__})
    return sub


def _rebuild_lowrank_experts(rebuild: Any, args: tuple) -> nn.Module:
    module = rebuild(*args)
    module.__class__ = _lowrank_class(type(module))
    return module


def install_expert_weights(module: nn.Module, name: str, weights: LowRankExpertWeights) -> torch.Tensor:
    """Put ``weights`` in place of the 3-D parameter ``name`` of an experts module; return the dense parameter.

    The module's class becomes ``LowRank<Class>`` (its own class with :class:`LowRankExperts` mixed in first),
    so its gating, activation and norms stay the ones of the original.
    """
    if not isinstance(module, LowRankExperts):
        module.__class__ = _lowrank_class(type(module))
        if "_old_forward" in module.__dict__:  # an accelerate hook (device_map) calls the forward it wrapped
            module._old_forward = types.MethodType(LowRankExperts.forward, module)
    old = module._parameters.pop(name)
    module.add_module(name, weights)
    return old


def restore_expert_weights(module: nn.Module, name: str, dense: nn.Parameter) -> None:
    """Put a dense stacked parameter back in place of its factors. Once none of its projections is factored, the
    module gets its own class (and forward) back: a measurement that tried factors and kept it dense leaves it as
    it was, so it runs and is reported (``experts_forward_path``) as the dense model's."""
    module._modules.pop(name, None)
    module.register_parameter(name, dense)
    if isinstance(module, LowRankExperts) and not any(isinstance(m, LowRankExpertWeights) for m in module.children()):
        original = type(module).__bases__[1]  # _lowrank_class: (LowRankExperts, the original class)
        module.__class__ = original
        if "_old_forward" in module.__dict__:
            module._old_forward = types.MethodType(original.forward, module)
