"""Decompose a loaded model in place: the one owner of module replacement.

Work goes layer by layer in order, so activation-aware methods can calibrate each layer
on the outputs of the already-compressed layers before it (a ``StatsProvider`` is asked
for one layer's statistics right before that layer is decomposed; with ``calib_staged``
for one stage of the layer at a time, in forward order: q,k,v -> o -> gate,up -> down).
Each dense weight is freed as soon as its replacement is in place, so memory never holds
two models.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import math
import mmap
import sys
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import torch
import torch.nn as nn

from .architectures import ArchitectureAdapter, adapter_for_model
from .methods import Factors, LayerStats, get_method, needs_calibration
from .methods.tucker import blas_single_threaded, choose_solver, gram_solves_release_gil
from .modules import (
    LowRankExperts,
    LowRankExpertWeights,
    LowRankLinear,
    dense_weight_of,
    expert_matrices,
    ensure_grouped_checked,
    experts_forward,
    experts_outputs_agree,
    experts_probe,
    install_expert_weights,
    is_experts_module,
    stacked_expert,
)
from .plan import Plan, Target, make_plan
from .spec import DecompositionSpec, SpecError


class StatsProvider(Protocol):
    """Gives calibration statistics for the targets of one decoder layer (1-based).

    Layers come in increasing order; with staged calibration the same layer comes once
    per stage, each time with that stage's targets and the earlier stages replaced.
    """

    def layer_stats(self, model: nn.Module, layer: int, targets: list[Target]) -> dict[str, LayerStats]: ...


@dataclass
class DecompositionReport:
    spec: DecompositionSpec
    plan: Plan
    params_before: int
    params_after: int
    seconds: float
    solvers: dict[str, int] = field(default_factory=dict)
    # The largest certified relative error of a top-r singular value over the modules whose solver
    # certifies one (Krylov), and how many those were; None/0 when no solver did.
    sv_error_bound: float | None = None
    sv_error_bound_modules: int = 0
    calibration: dict[str, Any] | None = None
    cache: dict[str, Any] | None = None
    allocation: dict[str, Any] | None = None  # budget allocators: realised budget, rounding
    shared_solves: dict[str, Any] | None = None  # data-parallel processes that split the solves (ProcessShard.describe)
    # How the solves ran: torch's thread count, and the solves run in parallel threads with the most workers at once.
    solve_threads: dict[str, int] | None = None

    @property
    def param_reduction(self) -> float:
        return 0.0 if self.params_before == 0 else 1.0 - self.params_after / self.params_before

    def to_dict(self) -> dict[str, Any]:
        spec = self.spec.to_dict()
        return {
            "method": self.spec.method,
            "rank": spec["rank"],
            "ranks": self.plan.ranks(),
            "budget": self.spec.budget,
            "allocator": self.spec.allocator if self.spec.budget is not None else None,
            "layers": sorted({t.layer for t in self.plan.targets}),
            "layers_arg": spec["layers"],
            "tensors": list(dict.fromkeys(t.tensor for t in self.plan.targets)),
            "tensors_arg": spec["tensors"],
            "layout": self.plan.layout,
            "adapter": self.plan.adapter,
            "modules": self.plan.module_names(),
            # stacked mixture-of-experts projections among them: path -> number of experts (each at the rank)
            "expert_modules": {t.path: t.experts for t in self.plan.targets if t.experts},
            "skipped": self.plan.skipped,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "params_removed": self.params_before - self.params_after,
            "param_reduction": self.param_reduction,
            "targeted_params_before": self.plan.targeted_dense_params,
            "decomposition_seconds": self.seconds,
            "solvers": self.solvers,
            "sv_error_bound": self.sv_error_bound,
            "sv_error_bound_modules": self.sv_error_bound_modules,
            "allocation": self.allocation,
            "calibration": self.calibration,
            "cache": self.cache,
            "shared_solves": self.shared_solves,
            "solve_threads": self.solve_threads,
            # every decomposition argument, defaults included (solver_tol, seed, asvd_alpha, ...): enough to redo it
            "spec": spec,
        }


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> nn.Module:
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    old = getattr(parent, leaf)
    setattr(parent, leaf, new)
    return old


class _PageReleaser:
    """Returns the pages of freed CPU weights that are mapped from safetensors files to the OS.

    transformers maps safetensors files into memory: a dense weight's pages stay resident
    after the tensor is dropped, because the mapping outlives it. ``madvise(MADV_DONTNEED)``
    on the page-aligned interior of a dead weight's range frees them; it is only applied to
    file-backed mappings, where a page touched again is re-read from the file, and only to
    whole pages inside the weight's own bytes.
    """

    MADV_DONTNEED = 4

    def __init__(self) -> None:
        self.ranges: list[tuple[int, int]] = []
        self.libc = None
        self.released = 0
        self.live: Counter[int] | None = None  # set by watch: nothing is released for a model not watched
        if not sys.platform.startswith("linux"):
            return
        try:
            with open("/proc/self/maps") as maps:
                for line in maps:
                    parts = line.split()
                    if len(parts) >= 6 and parts[5].endswith(".safetensors"):
                        lo, hi = (int(x, 16) for x in parts[0].split("-"))
                        self.ranges.append((lo, hi))
            if self.ranges:
                self.libc = ctypes.CDLL(None, use_errno=True)
                self.libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        except OSError:
            self.libc = None

    def watch(self, model: nn.Module) -> None:
        """Count, once, the module slots that hold each CPU storage (a tied weight counts in every module
        that holds it); ``retire`` then keeps the counts current. Collecting every parameter's storage
        after each replacement instead cost ~1.2 ms per module (a quarter of a rank-1 SmolLM2 decomposition)."""
        self.live = Counter(
            p.untyped_storage().data_ptr() for _, p in model.named_parameters(remove_duplicate=False) if p.device.type == "cpu"
        )

    def retire(self, old: nn.Module) -> None:
        """``old`` has left the model: its parameters stop counting, and its weight's pages go back if no
        live module holds that storage any more."""
        if self.live is None:
            return
        for p in old.parameters(recurse=False):
            if p.device.type == "cpu":
                ptr = p.untyped_storage().data_ptr()
                self.live[ptr] -= 1
                if self.live[ptr] <= 0:
                    del self.live[ptr]
        self.release(old.weight, self.live)

    def release(self, weight: torch.Tensor, live_ptrs: Collection[int]) -> None:
        if self.libc is None or weight.device.type != "cpu":
            return
        storage = weight.untyped_storage()
        start = storage.data_ptr()
        end = start + storage.nbytes()
        if start in live_ptrs or not any(lo <= start and end <= hi for lo, hi in self.ranges):
            return  # shared with a live parameter, or not file-backed: leave it alone
        lo = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
        hi = end // mmap.PAGESIZE * mmap.PAGESIZE
        if hi > lo and self.libc.madvise(lo, hi - lo, self.MADV_DONTNEED) == 0:
            self.released += hi - lo


def _module_seed(seed: int, path: str) -> int:
    # A stable per-module seed (Python's hash() is salted per process).
    h = 2166136261
    for ch in path.encode():
        h = ((h ^ ch) * 16777619) & 0xFFFFFFFF
    return (seed * 1_000_003 + h) & 0x7FFFFFFF


def decompose_model(
    model: nn.Module,
    spec: DecompositionSpec,
    adapter: ArchitectureAdapter | None = None,
    ranks: dict[str, int] | None = None,
    stats_provider: StatsProvider | None = None,
    progress: bool = True,
    on_module: Callable[[Target, LowRankLinear], None] | None = None,
    shard: ProcessShard | None = None,
) -> DecompositionReport:
    """Replace the planned linears of ``model`` by :class:`LowRankLinear` modules (and planned stacked expert
    parameters by :class:`LowRankExpertWeights`), in place.

    ``shard``: data-parallel processes holding the same model split the solves (every one of them must call this
    with the same model and spec); each ends with every module's factors, those its owner computed."""
    adapter = adapter or adapter_for_model(model)
    plan = make_plan(spec, model.config, adapter=adapter, ranks=ranks)
    check_decomposable(model, plan.targets)  # before any stage runs: a refusal leaves the model as it was
    params_before = count_parameters(model)
    method = get_method(spec.method)
    if needs_calibration(spec.method) and stats_provider is None:
        raise SpecError(f"method={spec.method!r} needs calibration data (calib=...), but no calibration source was given")
    start = time.perf_counter()
    solvers: dict[str, int] = {}
    bounds: list[float] = []
    by_layer: dict[int, list[Target]] = {}
    for t in plan.targets:
        by_layer.setdefault(t.layer, []).append(t)
    bar = _progress(len(plan.targets), f"decomposing ({spec.method})", enabled=progress)
    pages = _PageReleaser()
    if pages.libc is not None:
        pages.watch(model)
    staged = stats_provider is not None and spec.calib_staged and needs_calibration(spec.method)
    copy_budget = POOL_COPY_BUDGET * sum(p.numel() * p.element_size() for p in model.parameters())
    threads = {"torch_threads": torch.get_num_threads(), "pooled_solves": 0, "pool_workers": 0}
    if stats_provider is None:  # data-free: one stage in layer order, so that parallel solves balance
        stages = [(0, [t for layer in sorted(by_layer) for t in by_layer[layer]])]
    else:  # calibrated: layer by layer (stage by stage), each on the outputs of the layers before it

        def layer_stages(layer: int) -> list[list[Target]]:
            if not staged:
                return [by_layer[layer]]
            if adapter.stages is None and hasattr(stats_provider, "forward_stages"):
                return stats_provider.forward_stages(model, layer, by_layer[layer])  # read off the layer's forward
            return calibration_stages(by_layer[layer], adapter)

        # A generator: a layer's stages are found when the decomposition reaches it, on the stream as it is then.
        stages = ((layer, ts) for layer in sorted(by_layer) for ts in layer_stages(layer))
    for layer, targets in stages:
        _decompose_stage(model, spec, plan, method, targets, layer, stats_provider, solvers, bounds, pages, on_module, bar, copy_budget, shard, threads)
    # No gc.collect()/empty_cache() between stages: each dense weight's last reference is dropped as it is
    # replaced, so its memory returns to the (caching) allocator at once; a full GC per layer costs ~0.1 s on a
    # 7B model for nothing.
    bar.close()
    seconds = time.perf_counter() - start
    report = DecompositionReport(spec, plan, params_before, count_parameters(model), seconds, solvers)
    report.sv_error_bound, report.sv_error_bound_modules = (max(bounds) if bounds else None), len(bounds)
    report.solve_threads = threads
    if stats_provider is not None and hasattr(stats_provider, "describe"):
        report.calibration = stats_provider.describe()
    if shard is not None:
        report.shared_solves = shard.describe()
    return report


def check_decomposable(model: nn.Module, targets: Iterable[Target]) -> None:
    """Refuse, before anything is replaced, a target that is already decomposed or whose weight is not finite:
    one-line :class:`SpecError` naming the module. A solver given inf/nan returns NaN factors (``exact``) or
    fails inside LAPACK naming neither; calibrated methods replace layer by layer, so a refusal at the failing
    layer would leave the earlier ones rewritten.

    Finiteness costs one fp32-accumulated sum per weight (inf/nan propagate through it; a finite weight whose sum
    overflows is confirmed element-wise) and one device sync per device, not per weight. The sums run on one
    thread: a memory-bound pass, and on a busy 2-core machine two threads made each reduction wait on the other
    core (SmolLM2's 210 fp32 weights on a loaded 2-core machine: 1.6 s at two threads, 0.08-0.11 s at one)."""
    weights = [(t, *_dense_target_weight(model, t.layer, t.tensor, t.path, t.experts)) for t in targets]  # refuses a decomposed one
    sums: dict[torch.device, list[tuple[Target, str, torch.Tensor, torch.Tensor]]] = {}
    with _torch_threads(1), torch.no_grad():
        for t, where, weight in weights:
            if isinstance(weight, torch.Tensor) and weight.is_floating_point() and not weight.is_meta:  # offloaded: refused elsewhere
                sums.setdefault(weight.device, []).append((t, where, weight, weight.sum(dtype=torch.float32)))
    for found in sums.values():
        finite = torch.isfinite(torch.stack([total for *_, total in found])).tolist()
        for (t, where, weight, _), ok in zip(found, finite):
            if ok:
                continue
            bad = int((~torch.isfinite(weight)).sum())  # 0: finite entries whose sum overflowed
            if bad:
                raise SpecError(
                    f"{where} has non-finite values (inf/nan in {bad} of {weight.numel()} entries): cannot "
                    f"decompose it; check the checkpoint, or leave layer {t.layer}'s {t.tensor!r} out of layers=/tensors="
                )


def refuse_decomposed(model: nn.Module, spec: DecompositionSpec, adapter: ArchitectureAdapter) -> None:
    """A selected module that is decomposed already (a model compressed twice) is a one-line SpecError naming it,
    before calibration, a budget's allocation or the cache key read it as dense (budgets included: every module
    the spec selects is checked, whatever rank it will get)."""
    from .plan import candidate_modules

    for layer, tensor, path, experts in candidate_modules(spec, model.config, adapter):
        _dense_target_weight(model, layer, tensor, path, experts)


def _dense_target_weight(model: nn.Module, layer: int, tensor: str, path: str, experts: int) -> tuple[str, Any]:
    """(its name, the dense weight) of a target, or the one-line refusal of a target already decomposed."""
    if experts:  # the path names the stacked parameter itself
        owner, name = stacked_expert(model, path)
        weight, where = getattr(owner, name, None), path
        decomposed = weight if isinstance(weight, LowRankExpertWeights) else None
    else:
        module = model.get_submodule(path)
        base = getattr(module, "base_layer", module)  # a peft adapter wraps it: its base layer is what is replaced
        decomposed = base if isinstance(base, LowRankLinear) else None
        # not read from a LowRankLinear: its .weight builds the dense product only to be refused
        weight, where = None if decomposed is not None else getattr(base, "weight", None), f"{path}.weight"
    if decomposed is not None:
        raise SpecError(
            f"{path} is already decomposed (rank {decomposed.rank}): decomposition needs the dense weights; "
            f"load the dense model again, or leave layer {layer}'s {tensor!r} out of layers=/tensors="
        )
    return where, weight


def calibration_stages(targets: list[Target], adapter: ArchitectureAdapter) -> list[list[Target]]:
    """One layer's targets grouped by the adapter's stages, in forward order (q,k,v; o; gate,up; down)."""
    groups: dict[int, list[Target]] = {}
    for t in targets:
        groups.setdefault(adapter.stage_of(t.tensor), []).append(t)
    return [groups[i] for i in sorted(groups)]


def _decompose_stage(
    model: nn.Module,
    spec: DecompositionSpec,
    plan: Plan,
    method: Callable[..., Any],
    targets: list[Target],
    layer: int,
    stats_provider: StatsProvider | None,
    solvers: dict[str, int],
    bounds: list[float],
    pages: _PageReleaser,
    on_module: Callable[[Target, LowRankLinear], None] | None,
    bar: _progress,
    copy_budget: float = 0.0,
    shard: ProcessShard | None = None,
    threads: dict[str, int] | None = None,
) -> None:
    """Calibrate ``targets`` (one layer's, or one stage of them; all of them for a data-free method) on the model
    as it is now, then replace them in order."""
    for t in targets:  # before any statistics are gathered by the contract's routing
        if t.experts and is_experts_module(owner := stacked_expert(model, t.path)[0]):
            check_experts_contract(owner)
    stats = stats_provider.layer_stats(model, layer, targets) if stats_provider is not None else {}
    for t in [t for t in targets if t.experts]:  # stacked expert projections: one solve per expert
        _decompose_experts(model, spec, plan, method, t, stats.get(t.path), solvers, bounds, pages, copy_budget, shard, threads)
        bar.update()
    targets = [t for t in targets if not t.experts]
    if not targets:
        return
    found = []
    for t in targets:
        path = t.path
        old = model.get_submodule(path)
        if hasattr(old, "base_layer"):  # a peft adapter wraps it: decompose the base layer beneath
            path = f"{path}.base_layer"
            old = old.base_layer
        W, b = dense_weight_of(old)
        found.append((t, path, old, W, b))

    def solve(t: Target, W: torch.Tensor) -> Factors:
        with torch.no_grad():
            return method(W.detach().float(), t.rank, stats.get(t.path), solver=spec.solver, solver_tol=spec.solver_tol, seed=_module_seed(spec.seed, t.path), **spec.method_options())

    parallel = spec.method == "tucker" and not stats  # data-free and known to be thread-safe
    # closing: an exception in this loop (a Ctrl-C, a failed solve, on_module) ends the solver pool and its
    # one-thread settings now, not whenever the traceback that holds the generator is dropped
    jobs = [(t, W) for t, _, _, W, _ in found]
    with contextlib.closing(_solve_jobs(jobs, solve, spec, parallel, copy_budget, shard, threads)) as solved:
        del jobs
        for i, factors in enumerate(solved):  # in order, each replaced as soon as its factors are in
            (t, path, old, W, b), found[i] = found[i], None  # nothing else holds the dense weight now
            dtype, device = W.dtype, W.device
            with torch.no_grad():
                if factors is None:
                    factors = solve(t, W)
                new = LowRankLinear.from_factors(factors, None if b is None else b.detach(), layout=plan.layout, dtype=dtype, device=device)
            new.requires_grad_(old.weight.requires_grad)
            _set_submodule(model, path, new)
            if pages.libc is not None:
                pages.retire(old)
            solver = factors.info.get("solver", spec.method)
            solvers[solver] = solvers.get(solver, 0) + 1
            if "sv_error_bound" in factors.info:
                bounds.append(float(factors.info["sv_error_bound"]))
            del old, W, b, factors
            if on_module is not None:
                on_module(t, new)
            bar.update()


def _decompose_experts(
    model: nn.Module,
    spec: DecompositionSpec,
    plan: Plan,
    method: Callable[..., Any],
    t: Target,
    stats: list[LayerStats | None] | None,
    solvers: dict[str, int],
    bounds: list[float],
    pages: _PageReleaser,
    copy_budget: float = 0.0,
    shard: ProcessShard | None = None,
    threads: dict[str, int] | None = None,
) -> None:
    """Factor every expert's matrix of one stacked projection (seeded per expert; in parallel threads like the
    linears' solves where those pay) and put the factors in place.

    ``stats``: a calibrated method's statistics per expert, over the tokens routed to it. An expert that no
    calibration token reached has none and is solved data-free (``tucker``), which its solver name records.
    """
    owner, name = stacked_expert(model, t.path)
    W = getattr(owner, name)
    if not isinstance(W, nn.Parameter) or not is_experts_module(owner):
        raise SpecError(f"tensors: {t.tensor!r} at {t.path} is not a stacked expert projection of a supported experts module")
    check_experts_contract(owner)
    transposed = bool(owner.is_transposed)
    # one job per expert, its target's path naming the expert: its seed, whichever thread solves it
    jobs = [(replace(t, path=f"{t.path}.{e}"), We) for e, We in enumerate(expert_matrices(owner, name))]
    expert_of = {job.path: e for e, (job, _) in enumerate(jobs)}

    def solve(job: Target, We: torch.Tensor) -> Factors:
        s = stats[expert_of[job.path]] if stats is not None else None
        fn = method if s is not None or not needs_calibration(spec.method) else get_method("tucker")
        with torch.no_grad():
            f = fn(We.detach().float(), t.rank, s, solver=spec.solver, solver_tol=spec.solver_tol, seed=_module_seed(spec.seed, job.path), **spec.method_options())
        if fn is not method:
            f.info["solver"] = f"{f.info.get('solver', 'tucker')} (expert without calibration tokens)"
        return f

    parallel = spec.method == "tucker" and stats is None  # as for linears: data-free and thread-safe
    factors = []
    with torch.no_grad(), contextlib.closing(_solve_jobs(jobs, solve, spec, parallel, copy_budget, shard, threads)) as solved:
        for job, f in zip(list(jobs), solved):
            f = solve(*job) if f is None else f
            solver = f.info.get("solver", spec.method)
            solvers[solver] = solvers.get(solver, 0) + 1
            if "sv_error_bound" in f.info:
                bounds.append(float(f.info["sv_error_bound"]))
            factors.append(f)
        new = LowRankExpertWeights.from_factors(factors, layout=plan.layout, transposed=transposed, dtype=W.dtype, device=W.device)
    new.requires_grad_(W.requires_grad)
    old = install_expert_weights(owner, name, new)
    ensure_grouped_checked(owner)  # where its grouped forward would run (CUDA), once: it runs only if it agrees
    if pages.libc is not None and pages.live is not None and old.device.type == "cpu":  # a caller that watched the model
        ptr = old.untyped_storage().data_ptr()
        pages.live[ptr] -= 1
        if pages.live[ptr] <= 0:
            del pages.live[ptr]
        pages.release(old, pages.live)


_CHECKED_EXPERT_CLASSES: dict[type, bool] = {}


def check_experts_contract(module: nn.Module) -> None:
    """Refuse an experts class whose own forward differs from the factored one's contract (checked once per class
    on its dense weights, a few tokens, before anything is replaced): the factored forward reimplements it."""
    cls = type(module)
    if isinstance(module, LowRankExperts):  # its original class passed before its first projection was replaced
        return
    if cls not in _CHECKED_EXPERT_CLASSES:
        _CHECKED_EXPERT_CLASSES[cls] = _follows_experts_contract(module)
    if not _CHECKED_EXPERT_CLASSES[cls]:
        raise SpecError(
            f"tensors: the experts of {cls.__name__} do not follow transformers' experts contract (checked on their "
            f"own weights); leave the experts.* tensors out of tensors="
        )


def _follows_experts_contract(module: nn.Module) -> bool:
    try:
        with torch.no_grad():
            probe = experts_probe(module)
            return experts_outputs_agree(experts_forward(module, *probe), module(*probe))
    except Exception:  # another signature or layout: not this contract
        return False


# Solves run in parallel threads, one torch thread each, where that was measured to pay: the Krylov solver
# spends a third of its time in small ops that one core dispatches while the other multiplies, and its narrow
# GEMMs gain little from a second thread. decompose_model on all 210 SmolLM2 matrices at 2 threads: rank 1
# 0.67 -> 0.54 s, rank 8 1.27 -> 0.99 s. The Gram solver joins them where its syrk and eigensolve run without the
# GIL (tucker.gram_solves_release_gil; scipy's own wrappers hold it, which gained nothing). Methods with calibration
# statistics share factorisations between siblings, so they stay serial.
# Workers convert weights that are not fp32 to fp32 copies; together these may add at most this fraction of the
# model's bytes to the peak (fp32 weights are used in place).
POOL_COPY_BUDGET = 0.02


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _solve_in_parallel(
    jobs: list[tuple[Target, torch.Tensor] | None],
    solve: Callable[[Target, torch.Tensor], Factors],
    spec: DecompositionSpec,
    parallel: bool,
    copy_budget: float,
    record: dict[str, int] | None = None,
) -> Iterator[Factors | None]:
    """The factors of each job, in order, as they come: solved in parallel for ``parallel`` (a data-free
    method) CPU weights that the Krylov solver, or a GIL-free Gram solver, takes; None for the others, which the caller solves at the
    moment (one torch thread while the parallel solves run). Each solve is seeded per module and runs on one
    thread, so the results are those of a one-thread run. A job is dropped once its factors are handed out.
    ``record`` (the report's ``solve_threads``) counts the pooled solves and keeps the most workers."""
    threads = torch.get_num_threads()
    overlapping = {"krylov", "gram"} if gram_solves_release_gil() else {"krylov"}
    pooled = [
        i for i, (t, W) in enumerate(jobs)
        if parallel and W.device.type == "cpu" and choose_solver(tuple(W.shape), t.rank, spec.solver, W.device) in overlapping
    ]  # fmt: skip
    copies = max((4 * jobs[i][1].numel() for i in pooled if jobs[i][1].dtype != torch.float32), default=0)
    workers = min(threads, len(pooled), max(1, int(copy_budget // copies)) if copies else threads)
    if workers < 2:
        yield from [None] * len(jobs)
        return
    if record is not None:
        record["pooled_solves"] += len(pooled)
        record["pool_workers"] = max(record["pool_workers"], workers)
    with _torch_threads(1), blas_single_threaded():
        pool = ThreadPoolExecutor(workers)
        try:
            futures = {i: pool.submit(solve, *jobs[i]) for i in pooled}
            for i in range(len(jobs)):
                jobs[i] = None
                future = futures.pop(i, None)
                yield None if future is None else future.result()
        finally:  # on an error, or when the caller stops early, the solves not yet started are dropped
            pool.shutdown(wait=True, cancel_futures=True)


# Jobs per process in one round of shared solves: a round's factors are exchanged before the next round starts, so
# a process holds at most this many modules' factors besides its model; more per round balances shapes better.
SHARD_ROUND_JOBS = 16


@dataclass
class ProcessShard:
    """Data-parallel processes (``accelerate launch``) that hold the same model split its solves.

    The jobs go in rounds: each process solves its part of a round (balanced by the solves' cost, the same
    assignment on every process), then every process receives every factor of the round, on the CPU over a gloo
    group whatever the default backend (NCCL), and replaces the modules in order. So each process ends with the
    factors their owner computed (each solve is seeded per module, so they are those a single process computes),
    and a process that fails makes every process raise its error instead of waiting for it.
    """

    group: Any  # a torch.distributed group over every process (None: the default group, when it is gloo)
    rank: int
    world: int
    solved: list[int] = field(default_factory=list)  # jobs solved per process
    load: list[float] = field(default_factory=list)  # their estimated cost (elements x rank)
    exchange_seconds: float = 0.0

    def __post_init__(self) -> None:
        self.solved = self.solved or [0] * self.world
        self.load = self.load or [0.0] * self.world

    @classmethod
    def create(cls) -> ProcessShard | None:
        """Over every process of the initialised default group (collective: every process must call it); None
        with fewer than two processes."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
        group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        return cls(group, dist.get_rank(), dist.get_world_size())

    def all_gather(self, obj: Any) -> list[Any]:
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def assign(self, costs: list[float]) -> list[int]:
        """The process of each job of a round: longest first to the least loaded so far, counting earlier rounds
        (a calibrated layer's one-module stages, o and down, then alternate); ties go to the lower index."""
        owner = [0] * len(costs)
        for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
            p = min(range(self.world), key=lambda p: (self.load[p], p))
            owner[i] = p
            self.load[p] += costs[i]
        return owner

    def exchange_factors(self, local: dict[int, Factors], metas: list[dict[int, Any]]) -> dict[int, Factors]:
        """The other processes' factors of a round, given everyone's (info, [(shape, dtype)] * 3) per job: one
        all-gather of a byte buffer per process (each tensor padded to 8 bytes so that it can be viewed in place).
        Measured with 2 gloo processes, 16 rank-8 SmolLM2 modules: 4.9 ms against 20.9 ms for pickling the
        factors through all_gather_object."""
        import torch.distributed as dist

        def nbytes(shape: tuple[int, ...], dtype: str) -> int:
            return math.prod(shape) * getattr(torch, dtype).itemsize

        def padded(n: int) -> int:
            return -(-n // 8) * 8

        sizes = [sum(padded(nbytes(*spec)) for _, specs in m.values() for spec in specs) for m in metas]
        if max(sizes) == 0:
            return {}
        mine = torch.zeros(max(sizes), dtype=torch.uint8)
        at = 0
        for i in sorted(local):
            f = local[i]
            for t in (f.left, f.core, f.right):
                raw = t.detach().to("cpu").reshape(-1).view(torch.uint8)  # flat first: an (m, 1) tensor may have any stride
                mine[at : at + raw.numel()] = raw
                at += padded(raw.numel())
        everyone = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(everyone, mine, group=self.group)
        out: dict[int, Factors] = {}
        for p, m in enumerate(metas):
            if p == self.rank:
                continue
            at = 0
            for i in sorted(m):
                info, specs = m[i]
                parts = []
                for shape, dtype in specs:
                    n = nbytes(shape, dtype)
                    parts.append(everyone[p][at : at + n].view(getattr(torch, dtype)).reshape(shape))
                    at += padded(n)
                out[i] = Factors(*parts, dict(info))
        return out

    def describe(self) -> dict[str, Any]:
        return {"processes": self.world, "modules_per_process": list(self.solved), "exchange_seconds": round(self.exchange_seconds, 4)}


def _solve_jobs(
    jobs: list[tuple[Target, torch.Tensor] | None],
    solve: Callable[[Target, torch.Tensor], Factors],
    spec: DecompositionSpec,
    parallel: bool,
    copy_budget: float,
    shard: ProcessShard | None,
    threads: dict[str, int] | None = None,
) -> Iterator[Factors | None]:
    """The factors of each job, in order: shared between processes with ``shard``, else as _solve_in_parallel."""
    if shard is None:
        yield from _solve_in_parallel(jobs, solve, spec, parallel, copy_budget, threads)
    else:
        yield from _solve_shared(jobs, solve, spec, parallel, copy_budget, shard, threads)


def _solve_shared(
    jobs: list[tuple[Target, torch.Tensor] | None],
    solve: Callable[[Target, torch.Tensor], Factors],
    spec: DecompositionSpec,
    parallel: bool,
    copy_budget: float,
    shard: ProcessShard,
    threads: dict[str, int] | None = None,
) -> Iterator[Factors]:
    per_round = SHARD_ROUND_JOBS * shard.world
    for lo in range(0, len(jobs), per_round):
        span = list(range(lo, min(lo + per_round, len(jobs))))
        owner = dict(zip(span, shard.assign([float(jobs[i][1].numel()) * jobs[i][0].rank for i in span])))
        mine = [i for i in span if owner[i] == shard.rank]
        local: dict[int, Factors] = {}
        error: Exception | None = None
        try:
            for i, f in zip(mine, _solve_in_parallel([jobs[i] for i in mine], solve, spec, parallel, copy_budget, threads)):
                local[i] = f if f is not None else solve(*jobs[i])
        except Exception as exc:  # sent to the others as a description: they raise it too instead of waiting
            error = exc
        start = time.perf_counter()
        if error is not None:
            meta: Any = ("error", type(error).__name__, str(error), isinstance(error, SpecError))
        else:  # what each factor is; the bytes follow in one tensor
            meta = {i: (f.info, [(tuple(t.shape), str(t.dtype).removeprefix("torch.")) for t in (f.left, f.core, f.right)]) for i, f in local.items()}
        metas = shard.all_gather(meta)
        if error is not None:
            raise error
        for p, got in enumerate(metas):
            if isinstance(got, tuple):
                _, kind, message, user_error = got
                raise SpecError(message) if user_error else RuntimeError(f"process {p} failed decomposing: {kind}: {message}")
        received = shard.exchange_factors(local, metas)
        shard.exchange_seconds += time.perf_counter() - start
        for i in span:
            shard.solved[owner[i]] += 1
            jobs[i] = None
            yield local.pop(i) if i in local else received.pop(i)


def factors_digest(model: nn.Module) -> str | None:
    """sha256 over the bytes of every low-rank module's parameters, in module order (None: there are none): the
    same digest means the same factors, bit for bit."""
    h = hashlib.sha256()
    found = False
    for name, mod in model.named_modules():
        if isinstance(mod, (LowRankLinear, LowRankExpertWeights)):
            found = True
            h.update(name.encode())
            for pname, p in mod.named_parameters(recurse=False):
                if p.is_meta:  # offloaded: its bytes are not here
                    return None
                h.update(pname.encode())
                h.update(p.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest() if found else None


class _progress:
    """A minimal progress line on stderr (tqdm when available)."""

    def __init__(self, total: int, desc: str, enabled: bool = True) -> None:
        self._bar = None
        if enabled and total:
            try:
                from tqdm.auto import tqdm

                self._bar = tqdm(total=total, desc=desc, unit="module", file=sys.stderr, leave=False)
            except ImportError:
                pass

    def update(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
