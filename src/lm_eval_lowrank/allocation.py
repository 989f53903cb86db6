"""Rank allocation by parameter budget: ``budget=F`` keeps a fraction F of the targeted parameters.

The targeted parameters are those of every selected (layer, tensor) weight. A module whose
rank would save nothing is kept dense (it then counts in full). Ranks are multiples of
``rank_multiple``; the realised kept fraction is at most ``budget`` and within one rounding
step of it (one module's ``rank_multiple`` rank change, or its move from its largest
admissible rank back to dense), unless even the smallest ranks exceed the budget. Allocators:

- ``uniform``: the same kept fraction in every selected module.
- ``tail``: only the last K selected layers are compressed, each module keeping a fraction
  rho; K is the smallest number of layers for which rho >= ``TAIL_MIN_KEEP`` (LLM-ROM
  compresses the later layers and leaves the early ones dense).
- ``sensitivity`` (measured): for every selected layer and every kept fraction rho in
  ``SENSITIVITY_KEEPS``, only that layer is compressed with the spec's method (at the
  ranks that keep rho of each of its modules, fitted to the dense model's statistics),
  the mean next-token loss on held-out calibration tokens is measured, and the layer's
  dense modules are put back (the same objects: bit-exact). Each layer then gets one
  option of {dense, rho_1, rho_2, ...} so that the summed loss increases are least within
  the budget: an exact dynamic programme over the Pareto front of (parameters removed,
  loss increase) (a multiple-choice knapsack; single-layer increases are taken as additive).
  See :func:`measure_sensitivity` for the data split and the cost.
- ``output_error``: a proxy of each module's output error on calibration data at every
  rank, ``err(r) = ||(W - W_r) X||^2 / ||W X||^2`` read off the spectrum of W C_x W^T
  (rom/whiten) or of the truncated SVD projected on C_x (tucker); the ranks then come
  from a greedy descent on the lower convex hull of each module's error-vs-parameters
  curve (the cheapest error per parameter removed first). One dense calibration pass, no
  decomposition; the statistics are cached like the decomposition's first-layer stats.
  (This was ``sensitivity`` before the measured allocator; local error turned out to be a
  poor guide to the end-to-end loss on SmolLM2.)

:func:`allocate_ranks` returns a ``dict`` path -> rank with an ``info`` attribute that
records the realised budget, for the results JSON.
"""

from __future__ import annotations

import heapq
import json
import math
import os
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from .calibration import _first_tensor, capture_layer_calls
from .spec import ALLOCATORS, DecompositionSpec, SpecError, breakeven_rank

TAIL_MIN_KEEP = 0.7  # tail allocator: each compressed matrix keeps at least this fraction


@dataclass(frozen=True)
class Candidate:
    layer: int  # 1-based
    tensor: str
    path: str
    out_features: int
    in_features: int
    experts: int = 0  # a stacked expert projection: this many matrices, all at the candidate's one rank

    @property
    def dense(self) -> int:
        return max(1, self.experts) * self.out_features * self.in_features

    def params(self, rank: int, layout: str) -> int:
        """Parameters at ``rank`` (0 = kept dense)."""
        if rank <= 0:
            return self.dense
        return max(1, self.experts) * (rank * (self.out_features + self.in_features) + (rank * rank if layout == "tucker" else 0))

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
    held = {t: set(adapter.layers_of(t, adapter.num_layers(config))) for t in tensors}
    return [
        Candidate(layer, t, adapter.module_path(layer - 1, t), *shapes[t], experts=adapter.experts_of(t))
        for layer in layers
        for t in tensors
        if layer in held[t]
    ]


def _layout(spec: DecompositionSpec) -> str:
    from .plan import resolve_layout

    return resolve_layout(spec)


def continuous_rank(c: Candidate, keep: float, layout: str) -> float:
    """The (fractional) rank whose factors hold ``keep`` of the dense parameters."""
    target = keep * c.dense / max(1, c.experts)  # per matrix
    s = c.out_features + c.in_features
    if layout == "tucker":  # r^2 + r s = target
        return (-s + math.sqrt(s * s + 4 * target)) / 2
    return target / s


def floor_rank(c: Candidate, keep: float, multiple: int, layout: str) -> int:
    """The admissible rank at or below the one keeping ``keep`` of ``c`` (0: no rank saves parameters)."""
    adm = c.ranks(multiple, layout)
    if not adm:
        return 0
    r = math.floor(continuous_rank(c, keep, layout) / multiple) * multiple
    return min(max(r, adm[0]), adm[-1])


def next_rank(c: Candidate, rank: int, multiple: int, layout: str) -> int:
    """The rank one rounding step above ``rank``: the next multiple, or 0 (dense) where that would save nothing."""
    up = rank + multiple
    return 0 if up >= breakeven_rank(c.out_features, c.in_features, layout) else up


def fit_to_budget(cands: list[Candidate], keep: dict[str, float], target: float, multiple: int, layout: str) -> dict[str, int]:
    """Ranks near the per-module fractions ``keep`` with total kept params <= ``target`` when possible.

    Floor each rank to the multiple, then take one step up at a time (largest shortfall
    first) while the total stays within ``target``; a module at its largest admissible rank
    steps back to dense. The result is short of ``target`` by less than any module's next
    step. Modules not in ``keep`` stay dense.
    """
    ranks: dict[str, int] = {}
    for c in cands:
        if c.path not in keep:
            continue
        r = floor_rank(c, keep[c.path], multiple, layout)
        if r:
            ranks[c.path] = r
    by_path = {c.path: c for c in cands}

    def total() -> int:
        return sum(by_path[p].params(r, layout) for p, r in ranks.items()) + sum(c.dense for c in cands if c.path not in ranks)

    cur = total()
    # Grow the modules furthest below their share first; stop when no step fits. Without the step back to dense,
    # modules stuck at their largest rank left high budgets many steps short (uniform 0.95 at SmolLM2: 0.91).
    while True:
        best, best_gap = None, None
        for p, r in ranks.items():
            c = by_path[p]
            if cur + c.params(next_rank(c, r, multiple, layout), layout) - c.params(r, layout) > target:
                continue
            gap = continuous_rank(c, keep[p], layout) - r
            if best_gap is None or gap > best_gap:
                best, best_gap = p, gap
        if best is None:
            break
        c, r = by_path[best], ranks[best]
        up = next_rank(c, r, multiple, layout)
        cur += c.params(up, layout) - c.params(r, layout)
        if up:
            ranks[best] = up
        else:
            del ranks[best]  # kept dense
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


def error_curve(
    weight: torch.Tensor, cov: torch.Tensor | None, method: str, options: Mapping[str, Any] | None = None, abs_mean: torch.Tensor | None = None
) -> torch.Tensor:
    """err[k] = relative output error ||(W - W_k) X||^2 / ||W X||^2 of the method at rank k (k = 0..min).

    rom and whiten both reach the optimum: the tail sum of the eigenvalues of W C W^T.
    tucker truncates the plain SVD W = U S V^T: its error is sum_{i>k} s_i^2 v_i^T C v_i.
    asvd truncates the SVD of W D = U S V^T (``options``: its asvd_alpha and asvd_stat; ``abs_mean``: the inputs'
    mean |x| per channel): its discarded terms are u_i u_i^T W, so its error is sum_{i>k} u_i^T W C W^T u_i.
    Without statistics (cov None) the weight's own spectrum stands in (C = I).
    """
    tail = error_tail(weight, cov, method, options, abs_mean)
    total = float(tail[0])
    return tail / total if total > 0 else tail


def experts_error_curve(weights: torch.Tensor, stats: list[Any] | None, method: str, options: Mapping[str, Any] | None = None) -> torch.Tensor:
    """The relative output error of a stacked expert projection (E x out x in) with every expert at rank k: each
    expert's error on its routed tokens, summed over experts in proportion to their tokens, over the projection's
    whole output energy. Without statistics every expert counts alike (C = I)."""
    total = None
    for e in range(weights.shape[0]):
        s = stats[e] if stats is not None else None
        if stats is not None and s is None:
            continue  # no calibration token reached it: it adds no error on the calibration data
        tail = error_tail(weights[e], None if s is None else s.input_cov, method, options, None if s is None else s.input_abs_mean) * (1 if s is None else s.tokens)
        total = tail if total is None else total + tail
    if total is None:
        return torch.zeros(min(weights.shape[-2:]) + 1, dtype=torch.float64)
    return total / float(total[0]) if float(total[0]) > 0 else total


def error_tail(
    weight: torch.Tensor, cov: torch.Tensor | None, method: str, options: Mapping[str, Any] | None = None, abs_mean: torch.Tensor | None = None
) -> torch.Tensor:
    """tail[k] = ||(W - W_k) X||^2 / N (k = 0..min): :func:`error_curve` before normalising. Computed in fp64 on the
    weight's device (a GPU's solvers take minutes where a CPU's take hours at 7B), returned on the CPU."""
    W = weight.detach().to(torch.float64)
    device = W.device
    if cov is None:
        e = torch.linalg.svdvals(W).square()
    elif method in ("rom", "whiten"):
        from .methods.rom import output_spectrum

        e = output_spectrum(W, cov)
    elif method == "asvd":
        from .methods import LayerStats
        from .methods.asvd import DEFAULT_ALPHA, channel_scales

        C = cov.to(device=device, dtype=torch.float64)
        opts = options or {}
        d = channel_scales(LayerStats(C, 1, None, None if abs_mean is None else abs_mean.to(device)), opts.get("asvd_alpha", DEFAULT_ALPHA), opts.get("asvd_stat", "mean_abs"))
        U = torch.linalg.svd(W * d, full_matrices=False)[0]
        M = U.mT @ W  # row i: the weight that direction i carries, u_i^T W
        e = ((M @ C) * M).sum(dim=1)
    else:
        _, s, Vh = torch.linalg.svd(W, full_matrices=False)
        C = cov.to(device=device, dtype=torch.float64)
        e = s.square() * ((Vh @ C) * Vh).sum(dim=1)
    return _tail_sums(e.clamp_min(0).cpu()[: min(W.shape)])


def _tail_sums(e: torch.Tensor) -> torch.Tensor:
    """t[k] = sum of e[i] over i >= k (k = 0..n): the error left by keeping the first k directions."""
    return torch.cat([e.flip(0).cumsum(0).flip(0), torch.zeros(1, dtype=e.dtype)])


def _suffix_block_sums(M: torch.Tensor) -> torch.Tensor:
    """t[k] = sum of M[i, j] over i, j >= k (k = 0..n), for a square M."""
    rows = M.flip(0).cumsum(0).flip(0)  # rows[i, j] = sum_{i' >= i} M[i', j]
    both = rows.flip(1).cumsum(1).flip(1)
    return torch.cat([both.diagonal(), torch.zeros(1, dtype=M.dtype)])


def fisher_error_tail(
    weight: torch.Tensor, cov: torch.Tensor, fisher: torch.Tensor, method: str, options: Mapping[str, Any] | None = None, abs_mean: torch.Tensor | None = None
) -> torch.Tensor:
    """tail[k] = tr(diag(f) dW_k C dW_k^T) (k = 0..min), dW_k = W - W_k the method's rank-k truncation error, f the
    rows' Fisher sums: the output error weighed row by row by what the loss does with each output.

    Every method's W_k is a projection of W: P_k W with P_k = U_k U_k^T (rom, whiten: U the eigenvectors of
    W C W^T; asvd: the left singular vectors of W diag(s)), W V_k V_k^T (fwsvd: V the right singular vectors of
    D W, D = diag(sqrt f)), D^-1 U_k U_k^T D W (fwhiten: U those of D W C W^T D) or U_k S_k V_k^T (tucker). The
    tail is then a sum over the dropped directions of an M[i, j] (cross terms included, since D is no
    multiple of I): for fwsvd and fwhiten it is diagonal, for the others it is (U^T D^2 U) * (U^T W C W^T U).
    Computed in fp64 on the weight's device, returned on the CPU.
    """
    from .methods.fwhiten import FISHER_FLOOR
    from .methods.rom import output_principal_basis

    W = weight.detach().to(torch.float64)
    C = cov.to(device=W.device, dtype=torch.float64)
    f = fisher.to(device=W.device, dtype=torch.float64).clamp_min(0)
    k = min(W.shape)
    if method in ("fwsvd", "fwhiten"):  # diagonal: the tail of one spectrum
        if method == "fwsvd":
            _, s, Vh = torch.linalg.svd(f.sqrt()[:, None] * W, full_matrices=False)
            e = s.square() * ((Vh @ C) * Vh).sum(dim=1)
        else:  # the floored rows the method weighs by (see methods.fwhiten)
            d = f.clamp_min(FISHER_FLOOR * float(f.mean())).sqrt()
            e = output_principal_basis(d[:, None] * W, C, 1)[1][:k]
        return _tail_sums(e.cpu())
    if method in ("rom", "whiten"):
        U, _ = output_principal_basis(W, C, k)
        M = U.mT @ W
    elif method == "asvd":
        from .methods import LayerStats
        from .methods.asvd import DEFAULT_ALPHA, channel_scales

        opts = options or {}
        d = channel_scales(LayerStats(C, 1, None, None if abs_mean is None else abs_mean.to(device=W.device, dtype=torch.float64)), opts.get("asvd_alpha", DEFAULT_ALPHA), opts.get("asvd_stat", "mean_abs"))
        U = torch.linalg.svd(W * d, full_matrices=False)[0]
        M = U.mT @ W  # row i: the weight that direction i carries, u_i^T W
    else:  # tucker: the plain truncated SVD
        U, s, Vh = torch.linalg.svd(W, full_matrices=False)
        M = s[:, None] * Vh
    pair = (U.mT * f) @ U * (M @ C @ M.mT)  # (u_i^T D^2 u_j) (m_i^T C m_j)
    return _suffix_block_sums(pair.cpu()).clamp_min(0)


def _hull_path(c: Candidate, err: torch.Tensor, adm: list[int], layout: str) -> list[int]:
    """The ranks the greedy visits in this module, from dense: the vertices of the lower convex hull of
    (parameters, error) over its admissible ranks and the dense point, toward fewer parameters. From each vertex
    the next is the rank with the least error per parameter saved (of collinear ones, the farthest). One pass over
    the ranks (a monotone chain): scanning every lower rank at every step was quadratic in them."""
    chain: list[tuple[int, float, int]] = [(c.dense, 0.0, 0)]  # (parameters, error, rank), dense first
    for r in reversed(adm):  # descending rank: fewer parameters at each point
        point = (c.params(r, layout), float(err[r]), r)
        if point[0] >= c.dense:
            continue  # saves nothing
        while len(chain) >= 2:
            (x1, y1, _), (x2, y2, _) = chain[-2], chain[-1]
            # drop the middle point unless its slope from chain[-2] is strictly below the new point's
            if (y2 - y1) * (x1 - point[0]) >= (point[1] - y1) * (x1 - x2):
                chain.pop()
            else:
                break
        chain.append(point)
    return [r for _, _, r in chain[1:]]


def _descend_hulls(cands: list[Candidate], curves: dict[str, torch.Tensor], budget: float, multiple: int, layout: str) -> dict[str, int]:
    """Greedy on the convex hulls: take the step with the least error per removed parameter over all modules until
    the budget is met (the last step may overshoot). path -> rank, 0 for dense."""
    target = budget * sum(c.dense for c in cands)
    paths = {c.path: _hull_path(c, curves[c.path], c.ranks(multiple, layout), layout) for c in cands}
    by_path = {c.path: c for c in cands}
    state = {c.path: 0 for c in cands}
    step = {c.path: 0 for c in cands}  # index of each module's next hull vertex
    cur = sum(c.dense for c in cands)

    def slope(p: str) -> float:
        c, r, s = by_path[p], paths[p][step[p]], state[p]
        return (float(curves[p][r]) - (0.0 if s == 0 else float(curves[p][s]))) / (c.params(s, layout) - c.params(r, layout))

    heap = [(slope(c.path), i, c.path) for i, c in enumerate(cands) if paths[c.path]]
    heapq.heapify(heap)
    tick = len(cands)
    while cur > target and heap:
        _, _, p = heapq.heappop(heap)
        c, r = by_path[p], paths[p][step[p]]
        cur -= c.params(state[p], layout) - c.params(r, layout)
        state[p], step[p] = r, step[p] + 1
        if step[p] < len(paths[p]):
            heapq.heappush(heap, (slope(p), tick, p))
            tick += 1
    return state


def allocate_by_error(cands: list[Candidate], curves: dict[str, torch.Tensor], budget: float, multiple: int, layout: str) -> tuple[dict[str, int], dict[str, Any]]:
    """Greedy on the convex hull: lower ranks where error per removed parameter is least."""
    total = sum(c.dense for c in cands)
    target = budget * total
    by_path = {c.path: c for c in cands}
    state = _descend_hulls(cands, curves, budget, multiple, layout)
    cur = sum(c.params(state[c.path], layout) for c in cands)
    # A hull jump can overshoot: give back single steps where they cost the most error, while they fit (from the
    # largest rank, back to dense: the same steps as fit_to_budget's, which realised() reports).
    while True:
        best = None
        for p, r in state.items():
            if r == 0:
                continue
            c = by_path[p]
            up = next_rank(c, r, multiple, layout)
            step = c.params(up, layout) - c.params(r, layout)
            if cur + step > target:
                continue
            gain = (float(curves[p][r]) - (float(curves[p][up]) if up else 0.0)) / step
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


def fisher_loss_curve(weight: torch.Tensor, stats: Any, method: str, options: Mapping[str, Any] | None, scale: float) -> torch.Tensor:
    """loss[k]: the K-FAC estimate of the mean next-token loss increase (nats) when only this module is truncated to
    rank k. With F ~ (C / tr C) (x) diag(f / N) (its diagonal sums to the rows' Fisher sums per sequence) and the
    per-token Fisher ~ (T - 1) times the per-sequence one, dL ~ (T - 1) / (2N) tr(diag(f) dW C dW^T) / tr(C);
    ``scale`` = (T - 1) / (2N)."""
    if stats is None or stats.input_cov is None or stats.output_fisher is None:
        raise SpecError("allocator=fisher needs each module's input covariance and its rows' Fisher sums; these statistics lack one")
    C = stats.input_cov
    trace = float(C.diagonal().sum())
    tail = fisher_error_tail(weight, C, stats.output_fisher, method, options, stats.input_abs_mean)
    return tail * (scale / trace) if trace > 0 else torch.zeros_like(tail)


def experts_fisher_loss_curve(weights: torch.Tensor, stats: list[Any] | None, method: str, options: Mapping[str, Any] | None, scale: float) -> torch.Tensor:
    """The summed estimate over the experts of a stacked projection, each at rank k on its own routed tokens and
    gradients; an expert that no calibration token reached (or whose gradient is zero) adds nothing."""
    if stats is None:
        raise SpecError("allocator=fisher needs statistics for every expert projection")
    total = torch.zeros(min(weights.shape[-2:]) + 1, dtype=torch.float64)
    for e, s in enumerate(stats):
        if s is not None:
            total += fisher_loss_curve(weights[e], s, method, options, scale)
    return total


def sensitivity_curves(spec: DecompositionSpec, model: nn.Module, cands: list[Candidate], stats_provider: Any, fisher_scale: float | None = None) -> dict[str, torch.Tensor]:
    """Per-module error curves from one dense, layer-by-layer calibration pass: the relative output error, or with
    ``fisher_scale`` the K-FAC estimate of the loss increase (:func:`fisher_loss_curve`)."""
    from .modules import dense_weight_of, expert_matrices, stacked_expert
    from .plan import Target

    curves: dict[str, torch.Tensor] = {}
    by_layer: dict[int, list[Candidate]] = {}
    for c in cands:
        by_layer.setdefault(c.layer, []).append(c)
    for layer in sorted(by_layer):
        group = by_layer[layer]
        stats: dict[str, Any] = {}
        if stats_provider is not None:
            targets = [Target(c.layer, c.tensor, c.path, c.out_features, c.in_features, 1, experts=c.experts) for c in group]
            stats = stats_provider.layer_stats(model, layer, targets)
        for c in group:
            s, options = stats.get(c.path), spec.method_options()
            if c.experts:
                weights = expert_matrices(*stacked_expert(model, c.path))
                if fisher_scale is not None:
                    curves[c.path] = experts_fisher_loss_curve(weights, s, spec.method, options, fisher_scale)
                else:
                    curves[c.path] = experts_error_curve(weights, s, spec.method, options)
                continue
            mod = model.get_submodule(c.path)
            W, _ = dense_weight_of(getattr(mod, "base_layer", mod))
            if fisher_scale is not None:
                curves[c.path] = fisher_loss_curve(W, s, spec.method, options, fisher_scale)
            else:
                curves[c.path] = error_curve(W, None if s is None else s.input_cov, spec.method, options, None if s is None else s.input_abs_mean)
    return curves


# -- measured sensitivity -----------------------------------------------------------------

SENSITIVITY_KEEPS = (0.5, 0.7, 0.85)  # kept fractions measured per layer (plus budget/2 below 0.5)
# Held-out tokens per measurement (every 2nd scored). The cost is ~ratios x layers^2/2 layer-forwards
# on them: ~430 s on SmolLM2 (30 layers, one shared CPU thread); 512 tokens took half that, but their
# noisier table chose a worse placement (wikitext ppl 72.7 against 68.0 at a 7.9 % cut).
SENSITIVITY_EVAL_TOKENS = 1024
SENSITIVITY_STATS_TOKENS = 8192  # calibration tokens for the measurement's own statistics (one dense pass)
SENSITIVITY_SCORE_STRIDE = 2  # the LM head scores every 2nd position: on a 49k vocabulary it costs ~8 layers
SENSITIVITY_VERSION = "3"  # bump when a measurement changes meaning (keys the on-disk cache)
_FINAL_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "final_layer_norm", "norm_f")


def sensitivity_keeps(budget: float) -> tuple[float, ...]:
    """The kept fractions measured per layer; below the smallest, budget/2 joins so that the budget stays reachable."""
    if budget < SENSITIVITY_KEEPS[0]:
        return (round(budget / 2, 4), *SENSITIVITY_KEEPS)
    return SENSITIVITY_KEEPS


def layer_options(cands: list[Candidate], keeps: tuple[float, ...], multiple: int, layout: str) -> dict[int, dict[float, dict[str, int]]]:
    """layer -> kept fraction -> {path: rank}: every module of the layer floored to the multiple, as fit_to_budget starts."""
    out: dict[int, dict[float, dict[str, int]]] = {}
    for c in cands:
        for rho in keeps:
            r = floor_rank(c, rho, multiple, layout)
            if r:  # modules where no rank saves parameters stay dense
                out.setdefault(c.layer, {}).setdefault(rho, {})[c.path] = r
    return out


def choose_options(
    cost: dict[int, dict[float, float]], removed: dict[int, dict[float, int]], need: int, max_states: int = 100_000
) -> tuple[dict[int, float], dict[str, Any]]:
    """One option per layer (absent = dense) with summed ``removed`` >= ``need`` and the least summed ``cost``.

    A multiple-choice knapsack, solved by a dynamic programme over the layers that keeps the
    Pareto front of (removed, cost) states, with removed capped at ``need`` (more is no
    better). A state is dropped only when another removes at least as much for no more
    cost, so the result is optimal. Should the front exceed ``max_states`` it is thinned to
    states at least need/max_states apart in removal, the largest kept (still feasible, no
    longer exact; on SmolLM2 the front holds 40-130 states). When even the largest
    removals cannot reach ``need`` every layer takes its smallest kept fraction.
    """
    layers = sorted(cost)
    front: dict[int, tuple[float, tuple[tuple[int, float], ...]]] = {0: (0.0, ())}
    exact = True
    grid = max(1, need // max_states)
    for L in layers:
        nxt: dict[int, tuple[float, tuple[tuple[int, float], ...]]] = {}
        for rem, (c, chosen) in front.items():
            for rho in (None, *sorted(cost[L])):  # dense first: ties keep the layer dense
                r = rem if rho is None else min(need, rem + removed[L][rho])
                cc = c if rho is None else c + cost[L][rho]
                if r not in nxt or cc < nxt[r][0]:
                    nxt[r] = (cc, chosen if rho is None else (*chosen, (L, rho)))
        front, best = {}, math.inf
        for r in sorted(nxt, reverse=True):  # keep a state only if it is cheaper than every state removing more
            if nxt[r][0] < best:
                front[r], best = nxt[r], nxt[r][0]
        if len(front) > max_states:  # thin the front; the largest removal stays, so feasibility does too
            exact = False
            thin: dict[int, tuple[float, tuple[tuple[int, float], ...]]] = {}
            last = None
            for r in front:  # removal descending
                if last is None or last - r >= grid:
                    thin[r], last = front[r], r
            front = thin
    if need in front:
        c, chosen = front[need]
        return dict(chosen), {"dp": "exact" if exact else "thinned", "feasible": True, "predicted_increase": c, "states": len(front)}
    choice = {L: min(cost[L]) for L in layers if cost[L]}
    return choice, {"dp": "infeasible", "feasible": False, "predicted_increase": sum(cost[L][rho] for L, rho in choice.items()), "states": len(front)}


def _layer_inputs(model: nn.Module, layers: Any, ids: torch.Tensor, batch_size: int) -> list[list[Any]]:
    """[hidden at the first layer's input, each layer's call kwargs, token ids] per batch (the embedding pass only).
    Each layer's own: Gemma-2/3 and sliding-window models give layer types their own mask and RoPE."""
    return [list(t) for t in capture_layer_calls(model, layers, ids, batch_size)]


class _Head:
    """Final norm + LM head (+ the logit scalings some configs add), scoring every ``stride``-th position."""

    def __init__(self, model: nn.Module, layers: Any, stride: int) -> None:
        from .architectures import text_config

        inside = {id(m) for m in layers.modules()}
        norms = [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in _FINAL_NORM_NAMES and id(m) not in inside]
        self.head = model.get_output_embeddings()
        if not norms or self.head is None:
            raise SpecError(f"allocator=sensitivity: no final norm or LM head found in {type(model).__name__}; use allocator=output_error")
        self.norm = norms[-1]
        cfg = text_config(model.config)
        self.softcap = getattr(cfg, "final_logit_softcapping", None)  # Gemma-2/3
        self.divide = getattr(cfg, "logits_scaling", None)  # Granite
        self.multiply = getattr(cfg, "logit_scale", None)  # Cohere
        self.stride = stride

    def positions(self, length: int, device: torch.device) -> torch.Tensor:
        return torch.arange(0, length - 1, self.stride, device=device)

    def scale(self, z: torch.Tensor) -> torch.Tensor:
        if self.divide:
            z = z / self.divide
        if self.multiply:
            z = z * self.multiply
        if self.softcap:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def nll(self, h: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
        pos = self.positions(ids.shape[1], h.device)
        z = self.scale(self.head(self.norm(h[:, pos])).float())
        tgt = ids[:, pos + 1]
        return float(torch.nn.functional.cross_entropy(z.reshape(-1, z.shape[-1]), tgt.reshape(-1), reduction="sum")), tgt.numel()


def _tail_loss(layers: Any, start: int, batches: list[list[Any]], head: _Head) -> float:
    """Mean next-token loss with the hidden states of ``batches`` run from layer ``start`` (0-based) to the end."""
    nll, count = 0.0, 0
    for h, kw, ids in batches:
        for i in range(start, len(layers)):
            h = _first_tensor(layers[i](h, **kw[i]))
        a, b = head.nll(h, ids)
        nll, count = nll + a, count + b
    return nll / count


def _run_collect(model: nn.Module, layer: nn.Module, index0: int, batches: list[list[Any]], paths: list[str], experts: Collection[str] = ()) -> dict[str, Any]:
    """Run ``layer`` on ``batches`` in place (hidden <- output), accumulating X^T X / N of each path's input; for a
    stacked expert projection (in ``experts``) one entry per expert, over its routed tokens (None: no token)."""
    from .calibration import _experts_inputs, expert_inputs
    from .methods import LayerStats
    from .modules import stacked_expert

    accum: dict[str, torch.Tensor] = {}
    alias: dict[str, str] = {}
    seen: list[tuple[torch.Tensor, str]] = []  # held for the batch so that no later input reuses the memory
    tokens = 0
    owners: dict[str, list[str]] = {}
    for p in experts:
        owners.setdefault(p.rpartition(".")[0], []).append(p)
    expert_tokens: dict[tuple[str, int], int] = {}
    expert_sums: dict[tuple[str, int], torch.Tensor] = {}
    abs_sums: dict[Any, torch.Tensor] = {}  # per input channel, sum |x| (asvd's scale); keyed like the products

    def add_abs(key: Any, a: torch.Tensor) -> None:
        s = a.abs().sum(0).to(torch.float64).cpu()
        abs_sums[key] = abs_sums[key] + s if key in abs_sums else s

    def make_experts_hook(owner: str):
        def hook(mod: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            hidden, index, _weights = _experts_inputs(args, kwargs)
            for p, e, n, a in expert_inputs(mod, hidden, index, owners[owner]):
                a = a.float()
                xtx = (a.mT @ a).to(torch.float64).cpu()
                expert_sums[p, e] = expert_sums[p, e] + xtx if (p, e) in expert_sums else xtx
                add_abs((p, e), a)
                expert_tokens[p, e] = expert_tokens.get((p, e), 0) + n

        return hook

    def make_hook(path: str):
        def hook(_mod: nn.Module, args: tuple, _out: Any) -> None:
            x = args[0]
            owner = next((p for t, p in seen if t is x), None)
            if owner is not None and owner != path:  # q, k, v (gate, up) share their input: one product
                alias[path] = owner
                return
            seen.append((x, path))
            x2 = x.detach().reshape(-1, x.shape[-1]).float()
            xtx = (x2.mT @ x2).to(torch.float64).cpu()
            accum[path] = accum[path] + xtx if path in accum else xtx
            add_abs(path, x2)

        return hook

    handles = [model.get_submodule(p).register_forward_hook(make_hook(p)) for p in paths if p not in experts]
    handles += [model.get_submodule(o).register_forward_pre_hook(make_experts_hook(o), with_kwargs=True) for o in owners]
    try:
        for b in batches:
            seen.clear()
            b[0] = _first_tensor(layer(b[0], **b[1][index0])).detach()
            tokens += b[0].shape[0] * b[0].shape[1]
    finally:
        for hd in handles:
            hd.remove()
        seen.clear()
    stats: dict[str, Any] = {p: LayerStats(a / tokens, tokens, None, abs_sums[p] / tokens) for p, a in accum.items()}
    out = {p: stats[alias.get(p, p)] for p in paths if alias.get(p, p) in stats}
    for p in experts:
        n_experts = stacked_expert(model, p)[0].num_experts
        out[p] = [
            LayerStats(expert_sums[p, e] / expert_tokens[p, e], expert_tokens[p, e], None, abs_sums[p, e] / expert_tokens[p, e]) if (p, e) in expert_sums else None
            for e in range(n_experts)
        ]
    return out


def _truncate(f: Any, r: int) -> Any:
    """Rank-r factors from rank-R ones of a method whose core is diagonal and ordered (all built-in ones)."""
    from .methods import Factors

    return Factors(f.left[:, :r], f.core[:r, :r], f.right[:, :r], dict(f.info))


def _sha(obj: Any) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


@torch.no_grad()
def measure_sensitivity(
    spec: DecompositionSpec,
    model: nn.Module,
    adapter: Any,
    options: dict[int, dict[float, dict[str, int]]],
    input_ids: torch.Tensor,
    layout: str,
    batch_size: int = 8,
    eval_tokens: int = SENSITIVITY_EVAL_TOKENS,
    stats_tokens: int = SENSITIVITY_STATS_TOKENS,
    stride: int = SENSITIVITY_SCORE_STRIDE,
    cache_dir: Any = None,
    experts: Mapping[str, int] | None = None,
    fisher: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """The mean next-token loss with one layer compressed at a time, for every (layer, kept fraction) of ``options``.

    ``experts``: the paths among the options that are stacked expert projections (path -> number of experts);
    each expert is factored on its own routed tokens, all at the option's rank.

    ``fisher``: the rows' Fisher sums per path (E x out for experts) of a method that weighs its outputs by them
    (fwsvd, fwhiten), attached to each module's statistics.

    Data: the last ``eval_tokens`` worth of calibration sequences (a quarter of them at
    most, rounded down, but at least one: of 2 or 3 sequences, one) are scored and never
    enter the statistics; the measurement fits whiten/rom to the dense model's input
    statistics over up to ``stats_tokens`` of the other sequences (a single calibration
    sequence is both fitted and scored, ``held_out`` false). The final
    decomposition still calibrates on all sequences. All tensors of a layer are fitted to
    the dense layer's inputs (no staging).

    Cost: one dense pass over the statistics sequences, one factorisation per module at its
    largest measured rank (the smaller ranks are its leading columns), and per (layer,
    fraction) a run of the layers from that one to the end plus the head on the scored
    tokens, from hidden states cached at the layer's input. Memory: the model, the two
    hidden-state streams and one layer's factors; compressed modules are swapped in and the
    dense ones (the same objects) put back. ``cache_dir`` keeps the result as JSON.
    """
    from .decompose import _module_seed, _set_submodule, check_experts_contract
    from .methods import get_method, needs_calibration, with_output_fisher
    from .modules import LowRankExpertWeights, LowRankLinear, dense_weight_of, expert_matrices, install_expert_weights, restore_expert_weights, stacked_expert

    start = time.perf_counter()
    n, length = input_ids.shape
    n_eval = max(1, min(n // 4, math.ceil(eval_tokens / length)))
    held_out = n > n_eval
    eval_ids = input_ids[n - n_eval :]
    stat_ids = input_ids[: n - n_eval][: max(1, stats_tokens // length)] if held_out else input_ids
    calibrated = needs_calibration(spec.method)
    dtype = next(model.parameters()).dtype
    record: dict[str, Any] = {
        "keeps": sorted({rho for opts in options.values() for rho in opts}),
        "eval_sequences": int(eval_ids.shape[0]),
        "stats_sequences": int(stat_ids.shape[0]) if calibrated else 0,
        "sequence_length": int(length),
        "held_out": held_out,
        "score_stride": stride,
        "statistics": "dense model, per layer" if calibrated else "none (weights only)",
    }
    key = {
        "v": SENSITIVITY_VERSION,
        "method": spec.method,
        "solver": spec.solver,
        "solver_tol": spec.solver_tol,  # every solve takes it (the Krylov solver's stopping point)
        "seed": spec.seed,
        **spec.method_options(),
        "layout": layout,
        "dtype": str(dtype),
        "batch": batch_size,
        "tokens": _sha(input_ids.tolist()),
        **{k: record[k] for k in ("eval_sequences", "stats_sequences", "score_stride")},
        "options": [[L, rho, sorted(r.items())] for L in sorted(options) for rho, r in sorted(options[L].items())],
    }
    path = None if cache_dir is None else cache_dir / f"{_sha(key)}.json"
    if path is not None and path.is_file():
        try:
            blob = json.loads(path.read_text())
            loss = {int(L): {float(rho): v for rho, v in row.items()} for L, row in blob["loss"].items()}
            return {**record, "dense_loss": blob["dense_loss"], "loss": loss, "scored_tokens": blob["scored_tokens"], "seconds": time.perf_counter() - start, "measured_seconds": blob["seconds"], "cache": "hit"}
        except (OSError, ValueError, KeyError):  # a foreign or truncated file: measure again
            pass

    method = get_method(spec.method)
    layers = adapter.layers(model)
    head = _Head(model, layers, stride)
    was_training = model.training
    model.eval()
    try:
        ev = _layer_inputs(model, layers, eval_ids, 1)  # one sequence at a time: the vocabulary-wide logits stay small
        st = _layer_inputs(model, layers, stat_ids, batch_size) if calibrated else []
        dense = _tail_loss(layers, 0, ev, head)
        # The layer-by-layer run must reproduce the model's own forward, or the measurement means nothing.
        nll, count = 0.0, 0
        for _h, _kw, x in ev:
            z = model(input_ids=x, use_cache=False).logits.float()  # the model's own scalings included
            pos = head.positions(x.shape[1], x.device)
            nll += float(torch.nn.functional.cross_entropy(z[:, pos].reshape(-1, z.shape[-1]), x[:, pos + 1].reshape(-1), reduction="sum"))
            count += x[:, pos + 1].numel()
        tol = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4
        if not abs(nll / count - dense) <= tol * max(1.0, abs(dense)):
            raise SpecError(
                f"allocator=sensitivity: running {type(model).__name__} one layer at a time gives loss {dense:.5f}, "
                f"its forward {nll / count:.5f}; use allocator=output_error"
            )
        loss: dict[int, dict[float, float]] = {}
        experts = experts or {}
        for index0, layer in enumerate(layers):
            group = options.get(index0 + 1)
            paths = sorted({p for r in (group or {}).values() for p in r})
            stats = _run_collect(model, layer, index0, st, paths, [p for p in paths if p in experts]) if calibrated else {}  # also moves st past this (dense) layer
            if fisher is not None:
                stats = with_output_fisher(stats, fisher)
            if group:
                factors = {}
                for p in paths:
                    if p in experts:  # a stacked expert projection: every expert at the top rank, on its routed tokens
                        mod, name = stacked_expert(model, p)
                        check_experts_contract(mod)  # before its factored forward stands in
                        stacked, W = getattr(mod, name), expert_matrices(mod, name)
                        top = max(r[p] for r in group.values() if p in r)
                        per = stats.get(p) or [None] * W.shape[0]
                        fs = [
                            (method if s is not None or not calibrated else get_method("tucker"))(
                                W[e].detach().float(), top, s, solver=spec.solver, solver_tol=spec.solver_tol, seed=_module_seed(spec.seed, f"{p}.{e}"), **spec.method_options()
                            )
                            for e, s in enumerate(per)
                        ]  # fmt: skip
                        factors[p] = (p, fs, None, stacked)
                        continue
                    mpath, mod = p, model.get_submodule(p)
                    if hasattr(mod, "base_layer"):  # a peft adapter: its base layer is what decompose replaces
                        mpath, mod = f"{p}.base_layer", mod.base_layer
                    W, b = dense_weight_of(mod)
                    top = max(r[p] for r in group.values() if p in r)
                    f = method(W.detach().float(), top, stats.get(p), solver=spec.solver, solver_tol=spec.solver_tol, seed=_module_seed(spec.seed, p), **spec.method_options())
                    factors[p] = (mpath, f, None if b is None else b.detach(), W)
                done: dict[tuple, float] = {}
                for rho, ranks in sorted(group.items()):
                    sig = tuple(sorted(ranks.items()))
                    if sig not in done:  # tiny modules: two fractions may round to the same ranks
                        swapped: list[tuple[str, nn.Module]] = []
                        try:
                            for p, r in ranks.items():
                                mpath, f, b, W = factors[p]
                                if p in experts:  # truncated per expert; the dense parameter goes back below
                                    mod, name = stacked_expert(model, p)
                                    new = LowRankExpertWeights.from_factors([_truncate(fe, r) for fe in f], layout=layout, transposed=bool(mod.is_transposed), dtype=W.dtype, device=W.device)
                                    swapped.append((mpath, install_expert_weights(mod, name, new)))
                                    continue
                                diag = torch.count_nonzero(f.core - torch.diag(torch.diagonal(f.core))) == 0
                                fr = _truncate(f, r) if diag else method(W.detach().float(), r, stats.get(p), solver=spec.solver, solver_tol=spec.solver_tol, seed=_module_seed(spec.seed, p), **spec.method_options())
                                new = LowRankLinear.from_factors(fr, b, layout=layout, dtype=W.dtype, device=W.device)
                                swapped.append((mpath, _set_submodule(model, mpath, new)))
                            done[sig] = _tail_loss(layers, index0, ev, head)
                        finally:
                            for mpath, old in reversed(swapped):  # the dense modules (parameters) themselves: bit-exact
                                if isinstance(old, nn.Parameter):
                                    restore_expert_weights(*stacked_expert(model, mpath), old)
                                else:
                                    _set_submodule(model, mpath, old)
                    loss.setdefault(index0 + 1, {})[rho] = done[sig]
                del factors
            for item in ev:  # the dense stream moves past this layer
                item[0] = _first_tensor(layer(item[0], **item[1][index0])).detach()
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - start
    scored = sum(head.positions(x.shape[1], x.device).numel() * x.shape[0] for _h, _kw, x in ev)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps({"key": key, "dense_loss": dense, "loss": loss, "scored_tokens": scored, "seconds": seconds}))
            os.replace(tmp, path)
        except OSError:  # a read-only or full cache never breaks a run
            pass
    return {**record, "dense_loss": dense, "loss": loss, "scored_tokens": scored, "seconds": seconds, "cache": "miss" if path is not None else "disabled"}


def allocate_measured(
    spec: DecompositionSpec, model: nn.Module, cands: list[Candidate], stats_provider: Any, adapter: Any, multiple: int, layout: str
) -> tuple[dict[str, int], dict[str, Any]]:
    """Measure every (layer, kept fraction), pick per layer the option that meets the budget at least loss, fill the slack."""
    if stats_provider is None or getattr(stats_provider, "input_ids", None) is None:
        raise SpecError("allocator=sensitivity needs calibration tokens (a tokenizer and calib=...); use allocator=output_error or uniform without them")
    assert spec.budget is not None
    total = sum(c.dense for c in cands)
    target = spec.budget * total
    options = layer_options(cands, sensitivity_keeps(spec.budget), multiple, layout)
    cache_dir = None
    if getattr(stats_provider, "cache_dir", None) is not None and getattr(stats_provider, "model_key", None):  # cache=true
        from .assets import usable_cache_dir

        root = usable_cache_dir("sensitivity")
        cache_dir = None if root is None else root / stats_provider.model_key
    gradients = getattr(stats_provider, "fisher", None)  # the gradient pass of fwsvd and fwhiten
    table = measure_sensitivity(
        spec, model, adapter, options, stats_provider.input_ids, layout, batch_size=spec.calib_batch, cache_dir=cache_dir,
        experts={c.path: c.experts for c in cands if c.experts}, fisher=None if gradients is None else gradients.row_sums(model),
    )  # fmt: skip
    by_path = {c.path: c for c in cands}
    increase = {L: {rho: v - table["dense_loss"] for rho, v in row.items()} for L, row in table["loss"].items()}
    removed = {L: {rho: sum(by_path[p].dense - by_path[p].params(r, layout) for p, r in options[L][rho].items()) for rho in row} for L, row in increase.items()}
    need = max(0, math.ceil(total - target))
    choice, dp = choose_options(increase, removed, need)
    keep = {p: rho for L, rho in choice.items() for p in options[L][rho]}
    ranks = fit_to_budget(cands, keep, target, multiple, layout)  # fills the slack left by the discrete options
    measured = {k: v for k, v in table.items() if k != "loss"}
    measured["seconds"] = round(table["seconds"], 3)
    measured["loss_increase"] = {str(L): {str(rho): round(v, 6) for rho, v in row.items()} for L, row in sorted(increase.items())}
    return ranks, {
        "measured": measured,
        "chosen_layers": {str(L): rho for L, rho in sorted(choice.items())},
        "predicted_loss_increase": dp["predicted_increase"],
        "selection": {k: v for k, v in dp.items() if k != "predicted_increase"},
    }


def allocate_by_fisher(
    spec: DecompositionSpec, model: nn.Module, cands: list[Candidate], stats_provider: Any, multiple: int, layout: str
) -> tuple[dict[str, int], dict[str, Any]]:
    """Ranks where the summed K-FAC loss estimate is least (the greedy hull of :func:`allocate_by_error`), from one
    gradient pass (the rows' Fisher sums) and one dense calibration pass (the input covariances)."""
    gradients = getattr(stats_provider, "fisher", None)
    if gradients is None:
        raise SpecError("allocator=fisher needs calibration data with gradients (a tokenizer and calib=...)")
    n, length = gradients.input_ids.shape
    start = time.perf_counter()
    curves = sensitivity_curves(spec, model, cands, stats_provider, fisher_scale=(length - 1) / (2 * n))
    ranks, extra = allocate_by_error(cands, curves, spec.budget, multiple, layout)
    extra.pop("proxy_error_sum")
    extra.update(
        proxy="K-FAC estimate of the mean next-token loss increase (nats), each module alone, summed",
        predicted_loss_increase=round(sum(float(curves[p][r]) for p, r in ranks.items()), 6),
        seconds=round(time.perf_counter() - start, 3),
    )
    return ranks, extra


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
    from .plan import check_rank_multiple

    # before any measurement (make_plan checks the config's shapes before load; the model's may differ)
    check_rank_multiple(spec, [(c.out_features, c.in_features) for c in cands], layout)
    m = spec.rank_multiple
    if spec.allocator == "uniform":
        ranks, extra = allocate_uniform(cands, spec.budget, m, layout)
    elif spec.allocator == "tail":
        ranks, extra = allocate_tail(cands, spec.budget, m, layout)
    elif spec.allocator == "sensitivity":
        ranks, extra = allocate_measured(spec, model, cands, stats_provider, adapter, m, layout)
    elif spec.allocator == "output_error":
        curves = sensitivity_curves(spec, model, cands, stats_provider)
        ranks, extra = allocate_by_error(cands, curves, spec.budget, m, layout)
        extra["calibrated"] = stats_provider is not None
    elif spec.allocator == "fisher":
        ranks, extra = allocate_by_fisher(spec, model, cands, stats_provider, m, layout)
    else:
        raise SpecError(f"allocator={spec.allocator!r} is invalid: valid {', '.join(ALLOCATORS)}")
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
    # each compressed module's next step up: to dense from its largest rank (the rank past it saves nothing)
    steps = [c.params(next_rank(c, ranks[c.path], spec.rank_multiple, layout), layout) - c.params(ranks[c.path], layout) for c in cands if c.path in ranks]
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
