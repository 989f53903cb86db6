"""Rank allocation by parameter budget: ``budget=F`` keeps a fraction F of the targeted parameters.

The targeted parameters are those of every selected (layer, tensor) weight. A module whose
rank would save nothing is kept dense (it then counts in full). Ranks are multiples of
``rank_multiple``; the realised kept fraction is at most ``budget`` and within one rounding
step (one module's ``rank_multiple`` rank change) of it, unless even the smallest ranks
exceed the budget. Allocators:

- ``uniform``: the same kept fraction in every selected module.
- ``tail``: only the last K selected layers are compressed, each module keeping a fraction
  rho; K is the smallest number of layers for which rho >= ``TAIL_MIN_KEEP`` (LLM-ROM
  compresses the later layers and leaves the early ones dense).
- ``sensitivity``: a proxy of each module's output error on calibration data at every
  rank, ``err(r) = ||(W - W_r) X||^2 / ||W X||^2`` read off the spectrum of W C_x W^T
  (rom/whiten) or of the truncated SVD projected on C_x (tucker); the ranks then come
  from a greedy descent on the lower convex hull of each module's error-vs-parameters
  curve (the cheapest error per parameter removed first). One dense calibration pass, no
  decomposition; the statistics are cached like the decomposition's first-layer stats.

:func:`allocate_ranks` returns a ``dict`` path -> rank with an ``info`` attribute that
records the realised budget, for the results JSON.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from .spec import DecompositionSpec, SpecError, breakeven_rank

TAIL_MIN_KEEP = 0.7  # tail allocator: each compressed matrix keeps at least this fraction


@dataclass(frozen=True)
class Candidate:
    layer: int  # 1-based
    tensor: str
    path: str
    out_features: int
    in_features: int

    @property
    def dense(self) -> int:
        return self.out_features * self.in_features

    def params(self, rank: int, layout: str) -> int:
        """Parameters at ``rank`` (0 = kept dense)."""
        if rank <= 0:
            return self.dense
        return rank * (self.out_features + self.in_features) + (rank * rank if layout == "tucker" else 0)

    def ranks(self, multiple: int, layout: str) -> list[int]:
        """Admissible ranks, ascending: multiples of ``multiple`` below break-even."""
        limit = breakeven_rank(self.out_features, self.in_features, layout)
        return list(range(multiple, limit, multiple))


class RankAllocation(dict):
    """path -> rank, with ``info`` describing the allocation (realised budget etc.)."""

    info: dict[str, Any]


def candidates(spec: DecompositionSpec, config: Any, adapter: Any) -> list[Candidate]:
    """Every selected (layer, tensor) weight, layer-major."""
    tensors = spec.selected_tensors(adapter.tensor_names())
    layers = spec.selected_layers(adapter.num_layers(config))
    shapes = adapter.tensor_shapes(config)
    return [Candidate(layer, t, adapter.module_path(layer - 1, t), *shapes[t]) for layer in layers for t in tensors]


def _layout(spec: DecompositionSpec) -> str:
    from .plan import resolve_layout

    return resolve_layout(spec)


def continuous_rank(c: Candidate, keep: float, layout: str) -> float:
    """The (fractional) rank whose factors hold ``keep`` of the dense parameters."""
    target = keep * c.dense
    s = c.out_features + c.in_features
    if layout == "tucker":  # r^2 + r s = target
        return (-s + math.sqrt(s * s + 4 * target)) / 2
    return target / s


def fit_to_budget(cands: list[Candidate], keep: dict[str, float], target: float, multiple: int, layout: str) -> dict[str, int]:
    """Ranks near the per-module fractions ``keep`` with total kept params <= ``target`` when possible.

    Floor each rank to the multiple, then add one step at a time (largest shortfall
    first) while the total stays within ``target``: the result is at most one step short.
    Modules not in ``keep`` stay dense.
    """
    ranks: dict[str, int] = {}
    for c in cands:
        if c.path not in keep:
            continue
        adm = c.ranks(multiple, layout)
        if not adm:
            continue  # no admissible rank saves parameters: dense
        r = math.floor(continuous_rank(c, keep[c.path], layout) / multiple) * multiple
        ranks[c.path] = min(max(r, adm[0]), adm[-1])
    by_path = {c.path: c for c in cands}

    def total() -> int:
        return sum(by_path[p].params(r, layout) for p, r in ranks.items()) + sum(c.dense for c in cands if c.path not in ranks)

    cur = total()
    # Grow the modules furthest below their share first; stop when no step fits.
    while True:
        best, best_gap = None, None
        for p, r in ranks.items():
            c = by_path[p]
            nxt = r + multiple
            if nxt >= breakeven_rank(c.out_features, c.in_features, layout):
                continue
            step = c.params(nxt, layout) - c.params(r, layout)
            if cur + step > target:
                continue
            gap = continuous_rank(c, keep[p], layout) - r
            if best_gap is None or gap > best_gap:
                best, best_gap = p, gap
        if best is None:
            break
        step = by_path[best].params(ranks[best] + multiple, layout) - by_path[best].params(ranks[best], layout)
        ranks[best] += multiple
        cur += step
    return ranks


# -- allocators ---------------------------------------------------------------------------


def allocate_uniform(cands: list[Candidate], budget: float, multiple: int, layout: str) -> tuple[dict[str, int], dict[str, Any]]:
    target = budget * sum(c.dense for c in cands)
    ranks = fit_to_budget(cands, {c.path: budget for c in cands}, target, multiple, layout)
    return ranks, {}


def allocate_tail(cands: list[Candidate], budget: float, multiple: int, layout: str, min_keep: float = TAIL_MIN_KEEP) -> tuple[dict[str, int], dict[str, Any]]:
    """Compress only the last K layers, each module keeping rho, with K the fewest that meet the budget."""
    total = sum(c.dense for c in cands)
    layers = sorted({c.layer for c in cands})
    per_layer = {L: sum(c.dense for c in cands if c.layer == L) for L in layers}
    chosen_k, rho = len(layers), budget
    for k in range(1, len(layers) + 1):
        tail_params = sum(per_layer[L] for L in layers[-k:])
        r = 1.0 - (1.0 - budget) * total / tail_params
        if r >= min_keep:
            chosen_k, rho = k, r
            break
    tail = set(layers[-chosen_k:])
    keep = {c.path: rho for c in cands if c.layer in tail}
    ranks = fit_to_budget(cands, keep, budget * total, multiple, layout)
    return ranks, {"tail_layers": sorted(tail), "tail_keep": rho, "tail_min_keep": min_keep}


def error_curve(weight: torch.Tensor, cov: torch.Tensor | None, method: str) -> torch.Tensor:
    """err[k] = relative output error ||(W - W_k) X||^2 / ||W X||^2 of the method at rank k (k = 0..min).

    rom and whiten both reach the optimum: the tail sum of the eigenvalues of W C W^T.
    tucker truncates the plain SVD W = U S V^T: its error is sum_{i>k} s_i^2 v_i^T C v_i.
    Without statistics (cov None) the weight's own spectrum stands in (C = I).
    """
    W = weight.detach().to(torch.float64).cpu()
    if cov is None:
        e = torch.linalg.svdvals(W).square()
    elif method in ("rom", "whiten"):
        from .methods.rom import output_principal_basis

        _, e = output_principal_basis(W, cov, 1)
    else:
        _, s, Vh = torch.linalg.svd(W, full_matrices=False)
        C = cov.to(torch.float64).cpu()
        e = s.square() * ((Vh @ C) * Vh).sum(dim=1)
    e = e.clamp_min(0)
    k = min(W.shape)
    e = e[:k]
    total = float(e.sum())
    tail = torch.cat([e.flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=e.dtype)])
    return tail / total if total > 0 else tail


def _hull_next(c: Candidate, err: torch.Tensor, state: int, adm: list[int], layout: str) -> tuple[float, int] | None:
    """From rank ``state`` (0 = dense), the cheapest error per parameter saved over any lower rank."""
    cur_params = c.params(state, layout)
    cur_err = 0.0 if state == 0 else float(err[state])
    best: tuple[float, int] | None = None
    for r in adm:
        if state and r >= state:
            break
        saved = cur_params - c.params(r, layout)
        if saved <= 0:
            continue
        slope = (float(err[r]) - cur_err) / saved
        if best is None or slope < best[0]:
            best = (slope, r)
    return best


def allocate_by_error(cands: list[Candidate], curves: dict[str, torch.Tensor], budget: float, multiple: int, layout: str) -> tuple[dict[str, int], dict[str, Any]]:
    """Greedy on the convex hull: lower ranks where error per removed parameter is least."""
    total = sum(c.dense for c in cands)
    target = budget * total
    state = {c.path: 0 for c in cands}
    adm = {c.path: c.ranks(multiple, layout) for c in cands}
    by_path = {c.path: c for c in cands}
    cur = total
    heap: list[tuple[float, int, str, int]] = []
    tick = 0
    for c in cands:
        nxt = _hull_next(c, curves[c.path], 0, adm[c.path], layout)
        if nxt is not None:
            heapq.heappush(heap, (nxt[0], tick, c.path, nxt[1]))
            tick += 1
    while cur > target and heap:
        _, _, p, r = heapq.heappop(heap)
        c = by_path[p]
        cur -= c.params(state[p], layout) - c.params(r, layout)
        state[p] = r
        nxt = _hull_next(c, curves[p], r, adm[p], layout)
        if nxt is not None:
            heapq.heappush(heap, (nxt[0], tick, p, nxt[1]))
            tick += 1
    # A hull jump can overshoot: give back single steps where they cost the most error, while they fit.
    while True:
        best = None
        for p, r in state.items():
            if r == 0:
                continue
            c = by_path[p]
            up = r + multiple
            if up >= breakeven_rank(c.out_features, c.in_features, layout):
                continue
            step = c.params(up, layout) - c.params(r, layout)
            if cur + step > target:
                continue
            gain = (float(curves[p][r]) - float(curves[p][up])) / step
            if best is None or gain > best[0]:
                best = (gain, p, up, step)
        if best is None:
            break
        _, p, up, step = best
        state[p] = up
        cur += step
    ranks = {p: r for p, r in state.items() if r > 0}
    proxy = sum(float(curves[p][r]) for p, r in ranks.items())
    return ranks, {"proxy": "relative output error on calibration data", "proxy_error_sum": proxy}


def sensitivity_curves(spec: DecompositionSpec, model: nn.Module, cands: list[Candidate], stats_provider: Any) -> dict[str, torch.Tensor]:
    """Per-module error curves from one dense, layer-by-layer calibration pass."""
    from .modules import dense_weight_of
    from .plan import Target

    curves: dict[str, torch.Tensor] = {}
    by_layer: dict[int, list[Candidate]] = {}
    for c in cands:
        by_layer.setdefault(c.layer, []).append(c)
    for layer in sorted(by_layer):
        group = by_layer[layer]
        stats: dict[str, Any] = {}
        if stats_provider is not None:
            targets = [Target(c.layer, c.tensor, c.path, c.out_features, c.in_features, 1) for c in group]
            stats = stats_provider.layer_stats(model, layer, targets)
        for c in group:
            mod = model.get_submodule(c.path)
            W, _ = dense_weight_of(getattr(mod, "base_layer", mod))
            s = stats.get(c.path)
            curves[c.path] = error_curve(W, None if s is None else s.input_cov, spec.method)
    return curves


def allocate_ranks(
    spec: DecompositionSpec,
    model: nn.Module,
    adapter: Any = None,
    stats_provider: Any = None,
    tokenizer: Any = None,
) -> RankAllocation:
    """Ranks {module path: rank} that keep ``spec.budget`` of the targeted parameters."""
    from .architectures import adapter_for_model
    from .decompose import count_parameters

    if spec.budget is None:
        raise SpecError("budget is missing: allocate_ranks needs budget=F (0 < F < 1)")
    adapter = adapter or adapter_for_model(model)
    layout = _layout(spec)
    cands = candidates(spec, model.config, adapter)
    if not cands:
        raise SpecError("budget: no module is selected (check layers/tensors)")
    m = spec.rank_multiple
    if spec.allocator == "uniform":
        ranks, extra = allocate_uniform(cands, spec.budget, m, layout)
    elif spec.allocator == "tail":
        ranks, extra = allocate_tail(cands, spec.budget, m, layout)
    elif spec.allocator == "sensitivity":
        curves = sensitivity_curves(spec, model, cands, stats_provider)
        ranks, extra = allocate_by_error(cands, curves, spec.budget, m, layout)
        extra["calibrated"] = stats_provider is not None
    else:
        raise SpecError(f"allocator={spec.allocator!r} is invalid: valid uniform, tail, sensitivity")
    info = realised(cands, ranks, spec, layout, count_parameters(model))
    info.update(extra)
    out = RankAllocation(ranks)
    out.info = info
    if stats_provider is not None:
        stats_provider.allocation = info  # lands in the JSON through describe()
    return out


def realised(cands: list[Candidate], ranks: dict[str, int], spec: DecompositionSpec, layout: str, model_params: int) -> dict[str, Any]:
    """The exact budget reached: kept fraction of the targeted params and the whole-model cut."""
    selected = sum(c.dense for c in cands)
    kept = sum(c.params(ranks.get(c.path, 0), layout) for c in cands)
    removed = selected - kept
    steps = [c.params(ranks[c.path] + spec.rank_multiple, layout) - c.params(ranks[c.path], layout) for c in cands if c.path in ranks]
    return {
        "allocator": spec.allocator,
        "budget": spec.budget,
        "rank_multiple": spec.rank_multiple,
        "layout": layout,
        "selected_params": selected,
        "kept_params": kept,
        "realised_keep": kept / selected,
        "max_rounding_step": max(steps) if steps else 0,
        "modules_compressed": len(ranks),
        "modules_dense": len(cands) - len(ranks),
        "model_params": model_params,
        "model_param_reduction": removed / model_params if model_params else 0.0,
    }
