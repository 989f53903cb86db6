"""The decomposition plan: which modules, at which rank, worked out from a config alone.

This is the single owner of target matching. Decompose-on-load, validation before the
weights load, the design-space calculator and checkpoints all go through :func:`make_plan`,
so the parameter counts they report agree by construction.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

from .architectures import ArchitectureAdapter, adapter_for_config
from .spec import DecompositionSpec, SpecError, breakeven_rank


@dataclass(frozen=True)
class Target:
    layer: int  # 1-based
    tensor: str
    path: str  # module path inside the CausalLM
    out_features: int
    in_features: int
    rank: int
    has_bias: bool = False
    # A mixture-of-experts projection stacks this many experts' (out x in) matrices in one parameter at
    # ``path``; each is decomposed to ``rank`` on its own. 0: an ordinary linear module at ``path``.
    experts: int = 0

    @property
    def dense_params(self) -> int:
        return max(1, self.experts) * self.out_features * self.in_features

    def lowrank_params(self, layout: str) -> int:
        r = self.rank
        base = r * (self.out_features + self.in_features)
        return max(1, self.experts) * (base + (r * r if layout == "tucker" else 0))


@dataclass
class Plan:
    adapter: str
    num_layers: int
    layout: str
    targets: list[Target] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)  # targets kept dense, with the reason

    @property
    def params_removed(self) -> int:
        return sum(t.dense_params - t.lowrank_params(self.layout) for t in self.targets)

    @property
    def targeted_dense_params(self) -> int:
        return sum(t.dense_params for t in self.targets)

    def module_names(self) -> list[str]:
        return [t.path for t in self.targets]

    def ranks(self) -> dict[str, int]:
        return {t.path: t.rank for t in self.targets}

    def to_dict(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter,
            "layout": self.layout,
            "targets": [asdict(t) for t in self.targets],
            "skipped": self.skipped,
        }


DEFAULT_LAYOUT = "folded"  # measured faster than three factors (see benchmarks/forward.py)


def resolve_layout(spec: DecompositionSpec) -> str:
    return DEFAULT_LAYOUT if spec.layout == "auto" else spec.layout


def make_plan(
    spec: DecompositionSpec,
    config: Any,
    adapter: ArchitectureAdapter | None = None,
    ranks: dict[str, int] | None = None,
) -> Plan:
    """Resolve ``spec`` against a model config into concrete targets.

    ``ranks`` (module path -> rank) overrides the spec's ranks; budget allocators pass it.
    Raises :class:`SpecError` (one line, naming the argument) on any out-of-range value.
    """
    adapter = adapter or adapter_for_config(config)
    if adapter is None:
        raise SpecError(f"architecture {getattr(config, 'model_type', '?')!r} has no config-level adapter")
    layout = resolve_layout(spec)
    n_layers = adapter.num_layers(config)
    plan = Plan(adapter=adapter.name, num_layers=n_layers, layout=layout)
    if spec.is_noop:
        return plan
    tensors = spec.selected_tensors(adapter.tensor_names())
    layers = spec.selected_layers(n_layers)
    shapes = adapter.tensor_shapes(config)
    bias = adapter.has_bias or {}
    held = {t: set(adapter.layers_of(t, n_layers)) for t in tensors}  # layers that hold each tensor
    if tensors and not any(layer in held[t] for t in tensors for layer in layers):
        t = tensors[0]
        raise SpecError(
            f"layers={spec.to_dict()['layers']} holds no {'|'.join(tensors)}: in this architecture {t!r} is in layers "
            f"{_span(sorted(held[t]))} only"
        )
    if ranks is None and spec.budget is not None:
        # before any weight loads: a rank_multiple no module can take would leave the whole model dense
        check_rank_multiple(spec, [shapes[t] for t in tensors if any(layer in held[t] for layer in layers)], layout)
    if ranks is None and spec.budget is None:
        # A rank past a tensor's size is an error where the user named that tensor, or where no selected tensor
        # can take it; a tensor that came in through tensors=all or a pattern (Qwen2-MoE's 1x64 shared_expert_gate
        # under rank=8) is kept dense like any tensor whose rank saves nothing.
        named = set(spec.tensors or ()) | set(spec.rank_overrides)
        in_layers = [t for t in tensors if any(layer in held[t] for layer in layers)]
        oversized = [t for t in in_layers if spec.rank_for(t) > min(shapes[t])]
        refused = [t for t in oversized if t in named] or (oversized if len(oversized) == len(in_layers) else [])
        if refused:
            t = refused[0]
            out_f, in_f = shapes[t]
            r, breakeven = spec.rank_for(t), breakeven_rank(out_f, in_f, layout)
            saving = f"only ranks below {breakeven} save parameters" if breakeven > 1 else "no rank saves parameters"
            raise SpecError(f"rank={r} is invalid for tensor {t!r} ({out_f}x{in_f}): valid 1..{min(out_f, in_f)}, and {saving}")
    for layer, t, path in _candidates(adapter, layers, tensors, held):
        out_f, in_f = shapes[t]
        if ranks is not None:
            if path not in ranks:
                continue
            r = ranks[path]
        elif spec.budget is not None:
            continue  # the allocator fills ranks
        else:
            r = spec.rank_for(t)
        if r >= breakeven_rank(out_f, in_f, layout):
            plan.skipped.append(
                {"path": path, "rank": r, "reason": f"rank {r} saves no parameters for {out_f}x{in_f} (break-even {breakeven_rank(out_f, in_f, layout)})"}
            )
            continue
        plan.targets.append(Target(layer, t, path, out_f, in_f, r, bool(bias.get(t, False)), adapter.experts_of(t)))
    if plan.skipped:
        warnings.warn(
            f"{len(plan.skipped)} module(s) kept dense: their rank saves no parameters "
            f"(e.g. {plan.skipped[0]['reason']})",
            stacklevel=2,
        )
    return plan


def check_rank_multiple(spec: DecompositionSpec, shapes: list[tuple[int, int]], layout: str) -> None:
    """Refuse a budget under which no selected (out, in) shape has an admissible rank (a multiple of
    ``spec.rank_multiple`` below its break-even): every allocator would keep the model dense, silently."""
    if not shapes:
        return  # nothing selected: reported where the selection is resolved
    largest = max(breakeven_rank(out_f, in_f, layout) for out_f, in_f in shapes) - 1
    if largest < 1:
        raise SpecError("budget: no rank saves parameters in any selected module (check layers/tensors)")
    if spec.rank_multiple > largest:
        raise SpecError(
            f"rank_multiple={spec.rank_multiple} is invalid: no multiple of it below break-even saves parameters in any "
            f"selected module; valid 1..{largest}"
        )


def _candidates(adapter: ArchitectureAdapter, layers: list[int], tensors: tuple[str, ...], held: dict[str, set[int]]) -> list[tuple[int, str, str]]:
    """(layer, tensor, module path) of every selected tensor in every selected layer that holds it."""
    # A layer may not hold a tensor: e.g. the experts of a layer that is dense (DeepSeek's first layers).
    return [(layer, t, adapter.module_path(layer - 1, t)) for layer in layers for t in tensors if layer in held[t]]


def candidate_modules(spec: DecompositionSpec, config: Any, adapter: ArchitectureAdapter | None = None) -> list[tuple[int, str, str, int]]:
    """(1-based layer, tensor, module path, experts) of every module that ``spec``'s layers and tensors select,
    whatever its rank will be (a budget's allocator has not chosen them yet; a rank that saves nothing is listed)."""
    adapter = adapter or adapter_for_config(config)
    if adapter is None:
        raise SpecError(f"architecture {getattr(config, 'model_type', '?')!r} has no config-level adapter")
    if spec.is_noop:
        return []
    n_layers = adapter.num_layers(config)
    tensors = spec.selected_tensors(adapter.tensor_names())
    held = {t: set(adapter.layers_of(t, n_layers)) for t in tensors}
    return [(layer, t, path, adapter.experts_of(t)) for layer, t, path in _candidates(adapter, spec.selected_layers(n_layers), tensors, held)]


def candidate_paths(spec: DecompositionSpec, config: Any, adapter: ArchitectureAdapter | None = None) -> list[tuple[str, int]]:
    """(module path, experts) of :func:`candidate_modules`."""
    return [(path, experts) for _, _, path, experts in candidate_modules(spec, config, adapter)]


def _span(layers: list[int]) -> str:
    """1-based layers for a message: ``2..27`` when contiguous, else joined by ``|``."""
    if layers and layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 2:
        return f"{layers[0]}..{layers[-1]}"
    return "|".join(map(str, layers))
