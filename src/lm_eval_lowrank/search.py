"""Definition-1 search: the cheapest configuration whose accuracy drop stays within a tolerance.

    minimise objective(c)  subject to  accuracy(dense) - accuracy(c) <= tau

The candidate space follows the research's pruning rules (whole layers with all their
tensors, never the first two or the last layer, layers spread apart; plus the Table 4
sets). Evaluation is multi-fidelity successive halving: every candidate is screened on a
few documents (``limits[0]``), candidates that screen far beyond tau are pruned, the best
``1/eta`` go on to the next, larger ``limit``; only the last rung decides feasibility.

The core (:func:`search`) takes an injected ``evaluate(spec, limit, phase=..., label=...)``
that returns a store row, so it is tested without any model.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .latency_stats import LatencyRatio, latency_ratio
from .spec import SpecError, format_layers

OBJECTIVES = ("latency", "energy", "latency*energy", "memory", "params")
TIE_BREAKS = ("objective", "params")
TIE_LEVEL = 0.95  # the latency intervals' level when the search has no --confidence


@dataclass(frozen=True, eq=False)
class Candidate:
    name: str
    spec: Mapping[str, Any]  # the decomposition part of model_args ({} = dense)

    @property
    def is_dense(self) -> bool:
        return not self.spec


DENSE = Candidate("dense", {})


def stride_layer_sets(num_layers: int, stride: int, avoid_first: int = 2, avoid_last: int = 1) -> tuple[int, ...]:
    """Every ``stride``-th layer of the allowed band, from its first layer (e.g. 3, 6, ..., 27 of 30)."""
    lo, hi = avoid_first + 1, num_layers - avoid_last
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise SpecError(f"stride={stride!r} is invalid: an int >= 1")
    return tuple(range(lo, hi + 1, stride))


def default_candidates(
    num_layers: int,
    ranks: Sequence[int] = (1, 8),
    max_k: int = 4,
    table4: bool = True,
    keeps: Sequence[float] = (),
    strides: Sequence[int] = (),
    method: str | Sequence[str] | None = None,
    budgets: Sequence[float] = (),
    allocator: str = "fisher",
) -> list[Candidate]:
    """Whole layers, spread apart, avoiding the first two and the last, crossed with compressions and methods.

    Layer sets: k = 1..max_k spread layers, every ``stride``-th layer, and Table 4.
    Compressions: a pruned ``rank`` (the research's axis) or a kept fraction ``keep`` of
    each chosen layer's parameters (``budget=keep``, the activation-aware methods' axis).
    Besides those, ``budgets``: a kept fraction of every decoder matrix, placed by ``allocator`` (any
    layers, any tensors, a rank per module; ``fisher`` by default, the loss estimate).
    Methods: one, or several to compare them in one search (``("tucker", "asvd", "whiten")``).
    """
    from .design_space import spread_layer_sets, table4_layer_sets
    from .spec import ALLOCATORS

    band = max(num_layers - 3, 0)
    sets: dict[tuple[int, ...], str] = {}
    for k in range(1, min(max_k, band) + 1):
        sets.setdefault(spread_layer_sets(num_layers, k), f"spread{k}")
    for st in strides:
        layers = stride_layer_sets(num_layers, st)
        if layers:
            sets.setdefault(layers, f"every{st}")
    if table4:
        for name, layers in table4_layer_sets(num_layers).items():
            sets.setdefault(tuple(layers), f"t4:{name}")
    if not sets:
        raise SpecError(f"num_layers={num_layers} leaves no layers to decompose once the first two and the last are avoided")
    for keep in keeps:
        if not 0 < keep < 1:
            raise SpecError(f"keep={keep!r} is invalid: a fraction of parameters kept, 0 < keep < 1")
    for budget in budgets:
        if not 0 < budget < 1:
            raise SpecError(f"budget={budget!r} is invalid: a fraction of parameters kept, 0 < budget < 1")
    if budgets and allocator not in ALLOCATORS:
        raise SpecError(f"allocator={allocator!r} is invalid: valid: {', '.join(ALLOCATORS)}")
    methods = [method] if method is None or isinstance(method, str) else list(dict.fromkeys(method))
    if not methods:
        raise SpecError("give at least one method")
    compressions = [(f"r{r}", {"rank": str(r)}) for r in ranks] + [(f"keep{k:g}", {"budget": f"{k:g}"}) for k in keeps]
    if not compressions and not budgets:
        raise SpecError("give at least one rank, keep fraction or budget")
    out = []
    for m in methods:
        extra = {"method": m} if m and m != "tucker" else {}
        prefix = f"{m} " if extra else ""
        for tag, comp in compressions:
            for layers, name in sets.items():
                spec = {**comp, "layers": format_layers(layers), "tensors": "all", **extra}
                out.append(Candidate(f"{prefix}{tag} {name} [{format_layers(layers)}]", spec))
        for budget in budgets:  # the allocator places the cut: no layer set of ours
            out.append(Candidate(f"{prefix}budget{budget:g} {allocator} [all]", {"budget": f"{budget:g}", "allocator": allocator, "layers": "all", "tensors": "all", **extra}))
    return out


# -- scoring ------------------------------------------------------------------------------
def accuracy_drop(dense: Mapping[str, Any], row: Mapping[str, Any], aggregate: str = "mean") -> float:
    """accuracy(dense) - accuracy(row), averaged over tasks (``mean``) or the worst task (``max``)."""
    drops = []
    for task, a0 in (dense.get("accuracy") or {}).items():
        a = (row.get("accuracy") or {}).get(task)
        if a0 is not None and a is not None:
            drops.append(a0 - a)
    if not drops:
        raise SpecError("tasks: none of the tasks reports an accuracy-like metric (acc, exact_match, ...); the tolerance needs one")
    return max(drops) if aggregate == "max" else sum(drops) / len(drops)


def _doc_scores(row: Mapping[str, Any], task: str) -> dict[tuple[Any, Any], float] | None:
    listed = (row.get("doc_scores") or {}).get(task)
    return {(doc_id, doc_hash): float(v) for doc_id, doc_hash, v in listed} if listed else None


def bonferroni_z(z: float, k: int) -> float:
    """The one-sided z whose tail is ``z``'s tail over ``k``: k bounds at it all hold together at ``z``'s level."""
    if k <= 1:
        return z
    nd = statistics.NormalDist()
    return nd.inv_cdf(1 - (1 - nd.cdf(z)) / k)


def paired_drop_bounds(dense: Mapping[str, Any], row: Mapping[str, Any], aggregate: str, z: float) -> tuple[tuple[float, float, float] | None, str | None]:
    """((lower, upper, standard error), None): one-sided confidence bounds of the drop at ``z``, paired over the
    documents both rows scored (their ``doc_scores``); or (None, why) when they cannot be paired.
    ``mean``: the tasks' paired errors added in quadrature over the mean. ``max``: each bound is the largest of
    the tasks' own; the error is that of the task with the largest upper bound. The upper bound holds at ``z``'s
    level as it is (the worst task alone must exceed it), but the lower one is a union over the T tasks (any
    task's bound above tau prunes), so each task's lower bound is taken at the Bonferroni level 1 - (1 - level)/T:
    a candidate with every task truly within tau is then pruned with probability at most 1 - level."""
    from .gate import paired_drop_stderr

    per_task = []
    for task, a0 in (dense.get("accuracy") or {}).items():
        a = (row.get("accuracy") or {}).get(task)
        if a0 is None or a is None:
            continue
        b, c = _doc_scores(dense, task), _doc_scores(row, task)
        if b is None or c is None:
            return None, f"{task}: no per-document scores in the store row (rows stored without --confidence)"
        stderr, why = paired_drop_stderr(b, c, a0, a, task, source="the stored rows")
        if stderr is None:
            return None, f"{task}: {why}"
        per_task.append((a0 - a, stderr))
    if not per_task:
        return None, "no task reports an accuracy-like metric"
    if aggregate == "max":
        drop, stderr = max(per_task, key=lambda t: t[0] + z * t[1])
        z_low = bonferroni_z(z, len(per_task))
        return (max(d - z_low * se for d, se in per_task), drop + z * stderr, stderr), None
    stderr = math.sqrt(sum(se * se for _, se in per_task)) / len(per_task)
    mean = sum(d for d, _ in per_task) / len(per_task)
    return (mean - z * stderr, mean + z * stderr, stderr), None


def parse_objective(text: str) -> str:
    obj = str(text).replace(" ", "").lower()
    if obj in ("energy*latency", "latency×energy"):
        obj = "latency*energy"
    if obj not in OBJECTIVES:
        raise SpecError(f"objective={text!r} is invalid: valid: {', '.join(OBJECTIVES)}")
    return obj


def _or_inf(value: Any) -> float:
    return math.inf if value is None else float(value)


def objective_value(row: Mapping[str, Any], objective: str) -> tuple[float, str]:
    """(value, objective actually used). Energy falls back to latency where it is unavailable. A missing value
    is inf, never 0: the search minimises, so a row that did not report its cost must not win by it."""
    lat = row.get("seconds_per_token")
    if objective == "params":
        return _or_inf(row.get("params_after")), "params"
    if objective == "memory":
        return _or_inf(row.get("memory_bytes")), "memory"
    energy = row.get("joules_per_token") if row.get("energy_available") else None
    if objective in ("energy", "latency*energy") and energy is None:
        objective = "latency"
    if objective == "latency":
        return (float(lat) if lat is not None else math.inf), "latency"
    if objective == "energy":
        return float(energy), "energy"  # type: ignore[arg-type]
    return float(lat) * float(energy) if lat is not None else math.inf, "latency*energy"  # type: ignore[arg-type]


def _has_energy(row: Mapping[str, Any]) -> bool:
    return bool(row.get("energy_available")) and row.get("joules_per_token") is not None


def common_objective(rows: Iterable[tuple[str, Mapping[str, Any]]], objective: str) -> tuple[str, list[str]]:
    """(the objective to score all these (name, row) pairs on, the names of the rows without an energy reading).

    Rows compared with each other must be scored in one unit: an energy objective falls back to latency for all of
    them when any one lacks energy, never for that row alone (its seconds would compete with the others' joules)."""
    lacking = [name for name, row in rows if not _has_energy(row)]
    if objective in ("energy", "latency*energy") and lacking:
        return "latency", lacking
    return objective, lacking


class BaselineError(RuntimeError):
    """The dense baseline could not be evaluated: nothing can be compared with it (one line)."""


@dataclass
class Evaluation:
    candidate: Candidate
    limit: int | None
    row: dict[str, Any]
    drop: float
    objective: float
    rung: int


@dataclass
class SearchResult:
    best: Evaluation  # the dense baseline when no candidate is feasible, or when it is cheaper than all that are
    dense: Evaluation
    final: list[Evaluation]  # every evaluation of the last rung (dense first)
    history: list[Evaluation] = field(default_factory=list)
    objective_used: str = ""  # the one the last rung's rows were scored on
    notes: list[str] = field(default_factory=list)
    # the chosen candidate's latency over dense's, paired call by call (or why there is none); when dense is chosen
    # over feasible candidates, the cheapest candidate's, to show by how much
    latency_vs_dense: LatencyRatio | str | None = None
    # feasible candidates whose latency is not distinguishably above the fastest's: (candidate, its ratio to it)
    latency_ties: list[tuple[Evaluation, LatencyRatio]] = field(default_factory=list)
    # the lowest objective of dense and the feasible candidates (best unless a tie-break); None when none is feasible
    fastest: Evaluation | None = None
    cheapest_candidate: Evaluation | None = None  # the feasible candidate with the lowest objective
    latency_level: float = 0.95  # the level of the latency intervals

    @property
    def feasible(self) -> list[Evaluation]:
        return [e for e in self.final if not e.candidate.is_dense and e.row.get("feasible")]


def _calls(e: Evaluation) -> Mapping[str, Any]:
    return e.row.get("latency_calls") or {}


def latency_ties(fastest: Evaluation, others: Sequence[Evaluation], level: float) -> tuple[list[tuple[Evaluation, LatencyRatio]], list[str]]:
    """The candidates in ``others`` whose latency is not distinguishably above ``fastest``'s: the ``level``
    interval of their paired latency ratio to it reaches 1. Also the reasons some could not be paired."""
    ties, why = [], []
    for e in others:
        if e is fastest:
            continue
        got = latency_ratio(_calls(fastest), _calls(e), level)
        if isinstance(got, str):
            why.append(f"{e.candidate.name}: {got}")
        elif got.lower <= 1.0:
            ties.append((e, got))
    ties.sort(key=lambda t: t[1].ratio)
    return ties, why


def _tied_at_the_cut(going: list[Evaluation], rest: list[Evaluation], level: float) -> list[Evaluation]:
    """The feasible candidates just below a screening rung's cut whose latency is not distinguishably above that of
    the last one going on (their paired ratio's interval reaches 1), at most as many as go on already: one noisy
    reading at a few documents should not end a candidate that the next rung may find faster."""
    if not going or not going[-1].row.get("feasible"):
        return []
    ties, _ = latency_ties(going[-1], [e for e in rest if e.row.get("feasible")], level)
    return [e for e, _ in ties][: len(going)]


def pareto_front(evals: Iterable[Evaluation]) -> list[Evaluation]:
    """Points not dominated in (higher parameter reduction, lower accuracy drop), by reduction."""
    pts = list(evals)
    front = []
    for e in pts:
        red = e.row.get("param_reduction", 0.0)
        dominated = any(
            o.row.get("param_reduction", 0.0) >= red and o.drop <= e.drop and (o.row.get("param_reduction", 0.0) > red or o.drop < e.drop)
            for o in pts
        )
        if not dominated:
            front.append(e)
    front.sort(key=lambda e: (e.row.get("param_reduction", 0.0), e.drop))
    return front


Evaluate = Callable[..., Mapping[str, Any]]


def search(
    candidates: Sequence[Candidate],
    evaluate: Evaluate,
    tolerance: float,
    limits: Sequence[int | None] = (10, 50),
    objective: str = "latency*energy",
    eta: float = 3.0,
    prune_margin: float | None = None,
    aggregate: str = "mean",
    log: Callable[[str], None] = lambda s: None,
    confidence: float | None = None,
    family_wise: bool = False,
    tie_break: str = "objective",
) -> SearchResult:
    """Successive halving over ``limits``; the last rung decides feasibility (drop <= tolerance).

    At a screening rung, a candidate whose drop exceeds ``tolerance + prune_margin`` (default 0.1) is
    pruned (small limits are noisy, hence the margin); of the rest, those within tolerance
    come first (cheapest first), then the near misses (smallest drop first), and the best
    ``ceil(n / eta)`` go on.

    With ``confidence`` (e.g. 0.95) both kinds of rung use the paired one-sided bounds of the drop, over the
    documents the candidate and the dense model both scored (the rows' ``doc_scores``):
    - screening prunes a candidate only when its lower bound exceeds ``tolerance + prune_margin`` (default 0),
      so a candidate that is within tolerance is pruned with probability at most 1 - confidence, however few the
      documents (with ``aggregate="max"`` each task's lower bound is at 1 - (1 - confidence) / T over the T tasks,
      since any one of them prunes);
    - the last rung calls a candidate feasible only when its upper bound is within the tolerance.
    A row that cannot be paired is judged on its drop (screening with the 0.1 default margin), with a note.
    ``family_wise`` makes the level hold for all the candidates of a rung together (Bonferroni over the k
    candidates: each bound at 1 - (1 - confidence) / k). Picking the cheapest of many candidates that each passed
    at the plain level favours the ones whose bound came out too low; over k candidates at the tolerance, about
    k (1 - confidence) of them pass by chance.

    Latency is one noisy reading per candidate, so with the latency objective the result also lists the feasible
    candidates whose latency is within the noise of the fastest's: the interval of their paired latency ratio to it
    (at ``confidence``, else 0.95; rows at the same limit and batch size time the same batches) reaches 1.
    ``tie_break="params"`` then picks the most compressed of those tied with the fastest, which a re-run would
    not reverse by chance; the default keeps the fastest reading. ``latency_vs_dense`` is the chosen candidate's
    paired latency ratio to the dense baseline.
    """
    if tie_break not in TIE_BREAKS:
        raise SpecError(f"tie_break={tie_break!r} is invalid: valid: {', '.join(TIE_BREAKS)}")
    if confidence is not None and not 0.5 <= confidence < 1:
        raise SpecError(f"confidence={confidence:g} is invalid: give a level in [0.5, 1), e.g. 0.95")
    if family_wise and confidence is None:
        raise SpecError("family_wise needs a confidence level: it spreads that level over each rung's candidates")
    z: float | None = None
    objective = parse_objective(objective)
    if not math.isfinite(tolerance) or not 0 <= tolerance <= 1:  # accuracies are fractions: 3 meant as points would pass everything
        raise SpecError(f"tolerance={tolerance} is invalid: expected a finite drop in accuracy, 0 <= x <= 1 (e.g. 0.03 for 3 points)")
    if prune_margin is not None and (not math.isfinite(prune_margin) or prune_margin < 0):
        raise SpecError(f"prune_margin={prune_margin:g} is invalid: expected a finite margin >= 0")
    point_margin = 0.1 if prune_margin is None else prune_margin  # margin on the drop itself
    bound_margin = 0.0 if prune_margin is None else prune_margin  # margin on the lower bound (confidence)
    if not limits:
        raise SpecError("limits: give at least one evaluation limit")
    # later rungs must see at least the documents of earlier ones (None = all): screening on many and
    # deciding feasibility on few would turn successive halving upside down
    # a repeated rung would halve the candidates again on the documents it has already scored
    sizes = [math.inf if n is None else n for n in limits]
    if any(b <= a for a, b in zip(sizes, sizes[1:])):
        raise SpecError(f"limits={list(limits)!r} is invalid: give documents per rung in strictly ascending order, screening first, e.g. 10,50")
    if not math.isfinite(eta) or eta <= 1:
        raise SpecError(f"eta={eta} is invalid: expected a finite number > 1")
    if aggregate not in ("mean", "max"):
        raise SpecError(f"aggregate={aggregate!r} is invalid: valid: mean, max")
    history: list[Evaluation] = []
    notes: list[str] = []
    used = objective  # what the last rung scored its rows on
    fallbacks: list[tuple[int | None, list[str], int]] = []  # (limit, rows without energy, rows compared) per rung
    alive = list({c.name: c for c in candidates}.values())  # names identify candidates
    last = len(limits) - 1
    final: list[Evaluation] = []
    dense_eval: Evaluation | None = None
    for rung, limit in enumerate(limits):
        phase = "full" if rung == last else f"screen{rung}"
        pruned_names: set[str] = set()
        dense_row = dict(evaluate(dict(DENSE.spec), limit, phase=phase, label="dense"))
        if dense_row.get("status", "ok") != "ok":
            error = (str(dense_row.get("error") or "no error recorded").strip().splitlines() or [""])[0]
            raise BaselineError(f"the dense baseline failed at limit={limit}, so no candidate can be compared with it: {error}")
        dense_eval = Evaluation(DENSE, limit, dense_row, 0.0, objective_value(dense_row, objective)[0], rung)
        history.append(dense_eval)
        scored: list[Evaluation] = []
        level = confidence
        if confidence is not None:  # per bound: Bonferroni over this rung's candidates when family-wise
            level = 1 - (1 - confidence) / len(alive) if family_wise and len(alive) > 1 else confidence
            z = statistics.NormalDist().inv_cdf(level)
            if family_wise:
                log(f"rung {rung} (limit={limit}): {len(alive)} candidates, each bound at {level:.4g} (family-wise {confidence:g})")
        for cand in alive:
            row = dict(evaluate(dict(cand.spec), limit, phase=phase, label=cand.name))
            if row.get("status", "ok") != "ok":
                log(f"  {cand.name}: failed ({row.get('error')}), dropped")
                continue
            d = accuracy_drop(dense_row, row, aggregate)
            v, u = objective_value(row, objective)  # this row's own; the rung's common objective may differ
            row["feasible"] = d <= tolerance + 1e-12
            prune = d > tolerance + point_margin
            if z is not None:
                bounds, why = paired_drop_bounds(dense_row, row, aggregate, z)
                if bounds is None:
                    verb = "judged" if rung == last else f"screened at limit={limit}"
                    notes.append(f"{cand.name}: {verb} on its drop alone ({why})")
                else:
                    row["drop_lower"], row["drop_upper"], row["drop_stderr"] = bounds
                    prune = row["drop_lower"] > tolerance + bound_margin
                    if rung == last:
                        row["feasible"] = row["drop_upper"] <= tolerance + 1e-12
            ev = Evaluation(cand, limit, row, d, v, rung)
            scored.append(ev)
            history.append(ev)
            bounds_shown = f" (bounds {row['drop_lower']:+.3f} .. {row['drop_upper']:+.3f})" if "drop_upper" in row else ""
            unit = f" ({u}: no energy reading)" if u != objective else ""
            log(f"  [{phase} limit={limit}] {cand.name}: drop={d:+.3f}{bounds_shown} reduction={100 * row.get('param_reduction', 0):.2f}% objective={v:.4g}{unit}")
            if rung != last and prune:
                pruned_names.add(cand.name)
        compared = [dense_eval, *scored]
        used, lacking = common_objective(((e.candidate.name, e.row) for e in compared), objective)
        if used != objective:  # one unit for every row this rung ranks
            fallbacks.append((limit, lacking, len(compared)))
            for e in compared:
                e.objective = objective_value(e.row, used)[0]
            if len(lacking) < len(compared):
                log(f"rung {rung} (limit={limit}): no energy reading for {', '.join(lacking)}: every row of this rung is ranked on latency")
        if rung == last:
            final = compared
            break
        kept = [e for e in scored if e.candidate.name not in pruned_names]
        kept.sort(key=lambda e: (0, e.objective, -e.row.get("param_reduction", 0)) if e.row["feasible"] else (1, e.drop, e.objective))
        n_next = max(1, math.ceil(len(scored) / eta))
        rule = f"lower {level:.4g} bound beyond tau+{bound_margin:g}" if confidence is not None else f"beyond tau+{point_margin:g}"
        if confidence is not None and aggregate == "max":
            rule += ", each task's at Bonferroni over the tasks"
        going = kept[:n_next]
        tied = _tied_at_the_cut(going, kept[n_next:], confidence if confidence is not None else TIE_LEVEL) if used == "latency" else []
        alive = [e.candidate for e in going + tied]
        log(f"rung {rung} (limit={limit}): {len(scored)} screened, {len(scored) - len(kept)} pruned ({rule}), {len(alive)} go on")
        if tied:
            log(f"  {len(tied)} of them read slower than the cut ({going[-1].candidate.name}) by no more than the timing noise: {', '.join(e.candidate.name for e in tied)}")
        if not alive:
            notes.append(f"every candidate screened out at limit={limit} ({rule})")
            final = [dense_eval]
            break
    assert dense_eval is not None
    notes += _energy_notes(fallbacks, dense_eval.row)
    feasible = [e for e in final if not e.candidate.is_dense and e.row.get("feasible")]
    ties: list[tuple[Evaluation, LatencyRatio]] = []
    fastest: Evaluation | None = None
    cheapest: Evaluation | None = None
    vs_dense: LatencyRatio | str | None = None
    level = confidence if confidence is not None else TIE_LEVEL
    if feasible:
        cheapest = min(feasible, key=lambda e: (e.objective, -e.row.get("param_reduction", 0)))
        # the space holds the dense model too, and it always meets the tolerance: it wins when strictly cheaper
        best = fastest = dense_eval if dense_eval.objective < cheapest.objective else cheapest
        if used == "latency":
            ties, unpaired = latency_ties(fastest, feasible, level)
            if unpaired:
                notes.append(f"latency ties not checked for {len(unpaired)} candidate(s): {unpaired[0]}")
            if tie_break == "params" and ties:
                best = max([fastest, *(e for e, _ in ties)], key=lambda e: (e.row.get("param_reduction", 0), -e.objective))
        elif tie_break == "params":
            notes.append(f"tie_break=params applies to the latency objective (per-call timings); the objective here is {used}")
        if best is dense_eval:
            notes.append(
                f"dense is cheaper than every feasible candidate ({used} {dense_eval.objective:.4g} against "
                f"{cheapest.objective:.4g} for the cheapest, {cheapest.candidate.name}): keep the dense model"
            )
        vs_dense = latency_ratio(_calls(dense_eval), _calls(cheapest if best is dense_eval else best), level)
    else:
        best = dense_eval
        shown = f" with confidence {confidence:g} (paired upper bounds)" if confidence is not None else ""
        notes.append(f"no candidate stays within tolerance {tolerance:g}{shown}: keep the dense model")
    return SearchResult(
        best=best, dense=dense_eval, final=final, history=history, objective_used=used, notes=notes,
        latency_vs_dense=vs_dense, latency_ties=ties, fastest=fastest, cheapest_candidate=cheapest, latency_level=level,
    )


def _energy_notes(fallbacks: Sequence[tuple[int | None, list[str], int]], dense_row: Mapping[str, Any]) -> list[str]:
    """What the energy objective fell back on, per rung; one note as before when no row had a reading at all."""
    if not fallbacks:
        return []
    reason = dense_row.get("energy_reason") or "no energy counter"
    if all(len(lacking) == compared for _, lacking, compared in fallbacks):
        return [f"energy unavailable ({reason}): the objective falls back to latency (seconds per token)"]
    return [
        f"energy unavailable at limit={limit} for {', '.join(lacking)}: the objective falls back to latency (seconds per token) for all {compared} rows compared there"
        for limit, lacking, compared in fallbacks
    ]
