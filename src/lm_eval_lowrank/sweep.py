"""Characterisation sweeps: a grid over ranks x layer sets x tensor groups through hf-tucker.

Each configuration is one ``lm_eval.simple_evaluate(model="hf-tucker", ...)`` call and one
row in a :class:`~lm_eval_lowrank.store.Store`. A dense baseline row (no decomposition) is
always evaluated first, so every row has something to be compared with.

Configurations run **in-process**, one after another, each with a fresh model load
(hf-tucker decomposes in place, so weights cannot be shared between configurations).
Why not one subprocess per configuration: on a small CPU box a fresh interpreter costs
~7 s of imports plus ~20 s for lm-eval's TaskManager to index its tasks, which is as much
as evaluating SmolLM2 on a few dozen documents. The cost of in-process runs is the peak
memory figure: ``ru_maxrss`` is per process, so before each configuration the kernel's
peak-RSS counter is reset (``/proc/self/clear_refs``, Linux); the row records whether
that reset worked (``memory_reset``). Allocator memory kept from an earlier configuration
can still count, so treat in-process CPU memory as an upper bound.
"""

from __future__ import annotations

import contextlib
import gc
import io
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .spec import (
    DecompositionSpec,
    SpecError,
    check_batch_size,
    check_dtype_args,
    check_local_paths,
    expand_tensor_names,
    format_layers,
    parse_layers,
    parse_model_args,
    parse_tensors,
    split_model_args,
    tensor_matches,
)
from .store import Store, row_key

# Metrics that read as "accuracy" (higher is better), in order of preference per task.
PRIMARY_METRICS = ("acc_norm", "acc", "exact_match", "em", "f1", "mc2")  # the order of gate.PREFERRED_METRICS


# -- the grid ---------------------------------------------------------------------------
@dataclass(frozen=True)
class SweepConfig:
    """One point of the grid. ``rank is None`` is the dense baseline."""

    rank: int | None = None
    layers: tuple[int, ...] | None = None  # 1-based, None = all
    tensors: tuple[str, ...] | None = None  # None = all
    layer_set: str = "all"  # how the layers were chosen (for labels and plots)
    tensor_group: str = "all"

    @property
    def is_dense(self) -> bool:
        return self.rank is None

    def spec_args(self) -> dict[str, Any]:
        """The decomposition part of ``model_args`` (empty for the dense baseline)."""
        if self.is_dense:
            return {}
        return {
            "rank": str(self.rank),
            "layers": format_layers(self.layers),
            "tensors": "all" if self.tensors is None else "|".join(self.tensors),
        }

    @property
    def label(self) -> str:
        if self.is_dense:
            return "dense"
        return f"r{self.rank} layers[{self.layer_set}] tensors[{self.tensor_group}]"

    @property
    def axis(self) -> str:
        """Which single axis this point varies, for the sensitivity plots."""
        if self.is_dense:
            return "dense"
        one_layer = self.layers is not None and len(self.layers) == 1
        one_tensor = self.tensors is not None and len(self.tensors) == 1
        if one_layer and self.tensors is None:
            return "single-layer"
        if one_tensor and self.layers is None:
            return "single-tensor"
        if self.tensors is None:
            return "layer-set"
        if self.layers is None:
            return "tensor-group"
        return "mixed"


def model_info(model: str) -> tuple[int, tuple[str, ...], Any]:
    """(number of decoder layers, tensor short names, adapter) from the model's config alone."""
    from .design_space import config_adapter, load_config

    cfg = load_config(model)
    adapter = config_adapter(cfg)
    return adapter.num_layers(cfg), tuple(adapter.tensor_names()), adapter


LAYER_SETS_SYNTAX = (
    "';'-separated entries: table4 (the paper's Table 4 sets scaled to the depth), single "
    "(every layer alone), single:3|15|28 (each listed layer alone), spread:1-4 (k layers spread "
    "apart, avoiding the first two and the last), all, or an explicit set like 3|15|28"
)


def expand_layer_sets(text: str, num_layers: int) -> list[tuple[str, tuple[int, ...] | None]]:
    """Parse ``--layer-sets`` into (name, layers) pairs; ``None`` layers = every layer.

    A set holding every layer is ``("all", None)``, so that ``all`` and ``1-30`` are one configuration."""
    from .design_space import single_layers, spread_layer_sets, table4_layer_sets

    out: list[tuple[str, tuple[int, ...] | None]] = []
    entries = [e.strip() for e in str(text).split(";")]
    if not entries or any(not e for e in entries):
        raise SpecError(f"layer-sets={text!r} is invalid: empty entry; {LAYER_SETS_SYNTAX}")
    for entry in entries:
        low = entry.lower()
        try:
            if low == "table4":
                out += [(f"t4:{name}", layers) for name, layers in table4_layer_sets(num_layers).items()]
            elif low == "single":
                out += [(str(layer[0]), layer) for layer in single_layers(num_layers)]
            elif low.startswith("single:"):
                parsed = parse_layers(entry.split(":", 1)[1])
                out += [(str(x), (x,)) for x in (parsed or range(1, num_layers + 1))]
            elif low.startswith("spread:"):
                ks = parse_layers(entry.split(":", 1)[1])
                if ks is None:
                    raise SpecError("spread needs counts like spread:1-4")
                out += [(f"spread{k}", spread_layer_sets(num_layers, k)) for k in ks]
            elif low == "all":
                out.append(("all", None))
            else:
                layers = parse_layers(entry)
                out.append((format_layers(layers), layers))
        except SpecError as exc:
            raise SpecError(f"layer-sets={text!r} is invalid: entry {entry!r}: {exc}; {LAYER_SETS_SYNTAX}") from None
    for name, layers in out:
        if layers is not None and max(layers) > num_layers:
            raise SpecError(f"layer-sets={text!r} is invalid: layer {max(layers)} is past the end; this model has {num_layers} layers (1..{num_layers})")
    every_layer = tuple(range(1, num_layers + 1))
    return _dedupe([("all", None) if layers == every_layer else (name, layers) for name, layers in out])


TENSOR_GROUPS_SYNTAX = "','-separated entries: all, attn, mlp, single (each tensor alone), or tensor names joined by '|' like q|k"


def expand_tensor_groups(text: str, adapter: Any) -> list[tuple[str, tuple[str, ...] | None]]:
    """Parse ``--tensor-groups`` into (name, tensors) pairs; ``None`` tensors = all.

    Tensors are put in the adapter's order and a group holding every tensor is ``("all", None)``, so that ``q|k`` and
    ``k|q``, or ``all`` and every name listed, are one configuration (and one store key)."""
    from .design_space import tensor_groups

    groups = tensor_groups(adapter)
    names = tuple(adapter.tensor_names())
    out: list[tuple[str, tuple[str, ...] | None]] = []
    entries = [e.strip() for e in str(text).split(",")]
    if any(not e for e in entries):
        raise SpecError(f"tensor-groups={text!r} is invalid: empty entry; {TENSOR_GROUPS_SYNTAX}")
    for entry in entries:
        low = entry.lower()
        if low == "all":
            out.append(("all", None))
        elif low == "single":
            out += [(t, (t,)) for t in names]
        elif low in groups:
            out.append((low, groups[low]))
        else:
            tensors = parse_tensors(entry)
            bad = [t for t in tensors or () if not tensor_matches(t, names)]
            if bad:
                raise SpecError(f"tensor-groups={text!r} is invalid: unknown tensor {bad[0]!r}; valid: {'|'.join(names)} or {TENSOR_GROUPS_SYNTAX}")
            out.append(("|".join(tensors) if tensors else "all", expand_tensor_names(tensors, names) if tensors else None))
    return _dedupe([_canonical_tensor_group(name, tensors, names) for name, tensors in out])


def _canonical_tensor_group(name: str, tensors: tuple[str, ...] | None, names: tuple[str, ...]) -> tuple[str, tuple[str, ...] | None]:
    if tensors is None or set(tensors) >= set(names):
        return "all", None
    ordered = tuple(t for t in names if t in tensors)
    # an explicit list is named by its tensors in order; a group or pattern keeps its name
    return ("|".join(ordered) if name == "|".join(tensors) else name), ordered


def _dedupe(pairs: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    seen: set[Any] = set()
    out = []
    for name, value in pairs:
        if value not in seen:
            seen.add(value)
            out.append((name, value))
    return out


def build_grid(ranks: Sequence[int], layer_sets: Sequence[tuple[str, Any]], tensor_groups: Sequence[tuple[str, Any]], dense: bool = True) -> list[SweepConfig]:
    """The dense baseline, then ranks x layer sets x tensor groups (duplicates dropped)."""
    grid: list[SweepConfig] = [SweepConfig()] if dense else []
    seen = {(c.rank, c.layers, c.tensors) for c in grid}
    for r in ranks:
        for lname, layers in layer_sets:
            for tname, tensors in tensor_groups:
                ident = (r, layers, tensors)
                if ident not in seen:
                    seen.add(ident)
                    grid.append(SweepConfig(rank=r, layers=layers, tensors=tensors, layer_set=lname, tensor_group=tname))
    return grid


# -- evaluating one configuration -------------------------------------------------------
def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (Linux) so ru_maxrss covers only what follows."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def primary_metric(metrics: Mapping[str, Any]) -> str | None:
    """The metric a task is scored on among ``metrics`` (names as the store keeps them): the first of
    PRIMARY_METRICS, as the gate and compare choose."""
    return next((n for p in PRIMARY_METRICS for n in sorted(metrics) if n == p or n.startswith(p + ",")), None)


def extract_metrics(results: Mapping[str, Any], tasks: Iterable[str]) -> tuple[dict[str, dict[str, float]], dict[str, float | None], dict[str, str | None], dict[str, float | None]]:
    """(all metrics, primary accuracy, primary metric name, its stderr) per task.

    lm-eval keys look like ``acc,none``; the filter is kept only when it is not ``none``.
    Tasks with no accuracy-like metric (wikitext) get ``None`` as accuracy.
    """
    metrics: dict[str, dict[str, float]] = {}
    acc: dict[str, float | None] = {}
    names: dict[str, str | None] = {}
    errs: dict[str, float | None] = {}
    for task in tasks:
        res = results.get(task, {})
        m: dict[str, float] = {}
        se: dict[str, float] = {}
        for k, v in res.items():
            if "," not in k or not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            base, _, filt = k.partition(",")
            name = base if filt == "none" else f"{base},{filt}"
            if base.endswith("_stderr"):
                se[name.replace("_stderr", "", 1)] = float(v)
            else:
                m[name] = float(v)
        metrics[task] = m
        primary = primary_metric(m)
        names[task] = primary
        acc[task] = m[primary] if primary else None
        errs[task] = se.get(primary) if primary else None
    return metrics, acc, names, errs


def _finite(x: Any) -> float | None:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


# model_args keys the sweep and search set per configuration, so a value in --model-args would clash with them
SWEPT_KEYS = ("pretrained", "rank", "layers", "tensors")
# ... and those that would also compress the dense baseline or override an option, with what to use instead
SIZING_KEYS = {
    "budget": "it would compress the dense baseline; sizes are set per configuration (sweep: --ranks; search: --ranks, --keeps, --budgets)",
    "allocator": "search sets it per candidate from --allocator",
}


@dataclass
class Runner:
    """Evaluates configurations through hf-tucker in this process, caching rows in a store.

    ``evaluate(spec_args, limit)`` is what :mod:`lm_eval_lowrank.search` injects; a key
    already finished in the store is returned from the store without running anything.
    """

    model: str
    tasks: tuple[str, ...]
    store: Store
    include_path: str | None = None
    device: str = "cpu"
    batch_size: str | int = 1
    model_args: str = ""  # extra HFLM arguments, e.g. dtype=float32
    log: Callable[[str], None] = field(default=lambda s: print(s, file=sys.stderr, flush=True))
    task_manager_instance: Any = None  # a ready lm_eval TaskManager to share (built lazily otherwise)
    evaluated: int = 0  # configurations actually run (not served from the store)
    keep_doc_scores: bool = False  # store each document's primary score (paired intervals: search --confidence, report)

    def __post_init__(self) -> None:
        self.model_id = os.path.realpath(self.model) if os.path.isdir(self.model) else self.model
        self._extra = parse_model_args(self.model_args)
        clash = set(SWEPT_KEYS) & set(self._extra)
        if clash:
            raise SpecError(f"model-args={self.model_args!r} is invalid: {sorted(clash)} are set per configuration by sweep and search")
        sizing = [k for k in SIZING_KEYS if k in self._extra]
        if sizing:
            raise SpecError(f"model-args={self.model_args!r} is invalid: {sizing[0]}: {SIZING_KEYS[sizing[0]]}")
        options = {"device", "batch_size"} & set(self._extra)  # its own --device and --batch-size
        if options:
            key = sorted(options)[0]
            raise SpecError(f"model-args={self.model_args!r} is invalid: {key} is an option of its own, --{key.replace('_', '-')}")
        check_dtype_args(self._extra)  # before the first row, not in every row's lm_eval run
        check_local_paths(self._extra)
        check_batch_size(self.batch_size)
        self.decomposition_args, passed_on = split_model_args(self._extra)  # method, calibration options: every row gets them
        from .harness import check_passthrough_args

        try:  # a typo (calib_m=4) otherwise failed every row after its load, in from_pretrained
            check_passthrough_args(dict(passed_on))
        except SpecError as exc:
            raise SpecError(f"model-args={self.model_args!r} is invalid: {exc}") from None
        try:
            dense = _quiet_spec(self.decomposition_args)
        except SpecError as exc:
            raise SpecError(f"model-args={self.model_args!r} is invalid: {exc}") from None
        if not dense.is_noop:  # every row is compared with this one: it must be the uncompressed model
            raise SpecError(f"model-args={self.model_args!r} is invalid: it would decompose the dense baseline")

    def check_specs(self, specs: Iterable[Mapping[str, Any]]) -> None:
        """Check every configuration's decomposition (with the decomposition keys of ``model_args``) against the model's
        config: layers past the end, ranks too large, unknown tensors, as a one-line SpecError naming the configuration,
        before anything is evaluated rather than partway through."""
        from .design_space import config_adapter, load_config
        from .plan import make_plan

        config = load_config(self.model)
        adapter = config_adapter(config)
        for spec_args in specs:
            try:
                spec = _quiet_spec({**self.decomposition_args, **spec_args})
                if not spec.is_noop:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # ranks that save nothing: the run itself warns once
                        make_plan(spec, config, adapter)
            except SpecError as exc:
                raise SpecError(f"{spec_label(spec_args)}: {exc}") from None

    def unknown_tasks(self) -> list[str]:
        """The tasks lm-eval's TaskManager (with this include path) knows by no task, group or tag name, and that are
        no YAML file either: checked before the first model loads."""
        known = set(self.task_manager().all_tasks)
        return [t for t in self.tasks if t not in known and not os.path.isfile(t)]

    def key(self, spec_args: Mapping[str, Any], limit: int | None) -> str:
        return row_key(self.model_id, {**self._extra, **spec_args}, self.tasks, limit)

    def model_args_string(self, spec_args: Mapping[str, Any]) -> str:
        parts = [f"pretrained={self.model}"]
        parts += [f"{k}={v}" for k, v in self._extra.items()]
        parts += [f"{k}={v}" for k, v in spec_args.items()]
        return ",".join(parts)

    def task_manager(self) -> Any:
        if self.task_manager_instance is None:
            from lm_eval.tasks import TaskManager

            self.task_manager_instance = TaskManager(include_path=self.include_path) if self.include_path else TaskManager()
        return self.task_manager_instance

    def stale_reason(self, row: Mapping[str, Any]) -> str | None:
        """Why this runner cannot reuse a finished stored ``row`` of its key, or None when it can.

        The key leaves out device and batch size (old stores must still resume), but latency, energy and memory
        are properties of both, so a row measured on another device or batch size is not this runner's. A row
        that does not record them (written by hand) is taken as it is."""
        for field_name, mine in (("device", str(self.device)), ("batch_size", str(self.batch_size))):
            theirs = row.get(field_name)
            if theirs is not None and str(theirs) != mine:
                option = "--" + field_name.replace("_", "-")
                return f"stored with {option} {theirs}, not {mine}"
        if self.keep_doc_scores and "doc_scores" not in row:  # the paired statistics need each document's score
            return "stored without per-document scores"
        stored = row.get("primary_metric")
        if isinstance(stored, Mapping) and isinstance(row.get("metrics"), Mapping):
            for task, metric in stored.items():  # a row written when sweeps preferred acc to acc_norm
                now = primary_metric(row["metrics"].get(task) or {})
                if metric != now:
                    return f"stored with {task} scored on {metric}, now {now}"
        return None

    def stored_row(self, key: str) -> dict[str, Any] | None:
        """The stored row this runner reuses for ``key``: a finished one, measured on this device and batch size,
        and with per-document scores when it keeps them; None when it would evaluate."""
        row = self.store.get(key) if self.store.done(key) else None
        return None if row is None or self.stale_reason(row) is not None else row

    def evaluate(self, spec_args: Mapping[str, Any], limit: int | None, label: str = "", phase: str = "sweep", meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
        key = self.key(spec_args, limit)
        stored = self.stored_row(key)
        if stored is not None:
            return stored
        # Another sweep or search on this store may be evaluating it: wait for it, then take its row.
        with self.store.claim(key):
            self.store.refresh()
            stored = self.stored_row(key)
            if stored is not None:
                return stored
            old = self.store.get(key) if self.store.done(key) else None
            if old is not None:  # the new row supersedes it
                self.log(f"  {label or spec_label(spec_args)}: {self.stale_reason(old)}; evaluating again")
            row = self._run(key, dict(spec_args), limit, label, phase, dict(meta or {}))
            self.evaluated += 1
            return self.store.append(row)

    def _run(self, key: str, spec_args: dict[str, Any], limit: int | None, label: str, phase: str, meta: dict[str, Any]) -> dict[str, Any]:
        import lm_eval

        import lm_eval_lowrank.harness  # noqa: F401  (registers hf-tucker)

        base = {
            "key": key,
            "model": self.model_id,
            "label": label or (spec_label(spec_args)),
            "phase": phase,
            "spec": spec_args,
            "model_args": self.model_args_string(spec_args),
            "tasks": list(self.tasks),
            "limit": limit,
            "device": self.device,
            "batch_size": str(self.batch_size),
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **meta,
        }
        gc.collect()
        reset = _reset_peak_rss()
        start = time.perf_counter()
        # The calibration no-leak check reads the evaluated tasks from lm_eval's command line, which
        # an in-process evaluation does not have: name them, so that the check is enforced.
        from .calibration import EVAL_TASKS_ENV

        saved_env = os.environ.get(EVAL_TASKS_ENV)
        os.environ[EVAL_TASKS_ENV] = ",".join(self.tasks)
        try:
            out = lm_eval.simple_evaluate(
                model="hf-tucker",
                model_args=base["model_args"],
                tasks=list(self.tasks),
                limit=limit,
                task_manager=self.task_manager(),
                device=self.device,
                batch_size=self.batch_size,
                verbosity="ERROR",
                log_samples=self.keep_doc_scores,
            )
        except SpecError:
            raise
        except Exception as exc:  # one bad configuration must not end a long sweep
            self.log(f"  failed: {exc.__class__.__name__}: {exc}")
            return {**base, "status": "error", "error": f"{exc.__class__.__name__}: {exc}", "wall_seconds": time.perf_counter() - start}
        finally:
            if saved_env is None:
                os.environ.pop(EVAL_TASKS_ENV, None)
            else:
                os.environ[EVAL_TASKS_ENV] = saved_env
        wall = time.perf_counter() - start
        row = {**base, **row_from_results(out, self.tasks), "wall_seconds": wall, "memory_reset": reset, "status": "ok"}
        if self.keep_doc_scores:
            row["doc_scores"] = doc_scores_from_samples(out.get("samples") or {}, row["primary_metric"])
        del out
        gc.collect()
        return row


def _quiet_spec(args: Mapping[str, Any]) -> DecompositionSpec:
    """DecompositionSpec.from_args without its unused-argument warnings: checking many specs up front would repeat
    them, and the run itself says them."""
    with contextlib.redirect_stderr(io.StringIO()):
        return DecompositionSpec.from_args(args)


def spec_label(spec_args: Mapping[str, Any]) -> str:
    if not spec_args:
        return "dense"
    size = f"keep{spec_args['budget']}" if spec_args.get("budget") is not None and spec_args.get("rank") is None else f"r{spec_args.get('rank')}"
    method = f"{spec_args['method']} " if spec_args.get("method") not in (None, "tucker") else ""
    return f"{method}{size} layers[{spec_args.get('layers', 'all')}] tensors[{spec_args.get('tensors', 'all')}]"


def doc_scores_from_samples(samples: Mapping[str, Sequence[Mapping[str, Any]]], primary: Mapping[str, str | None]) -> dict[str, list[list[Any]]]:
    """task -> [[doc_id, doc_hash, value], ...] of the task's primary metric, from ``simple_evaluate``'s samples
    (``log_samples=True``); a task whose samples do not give one number per document is left out."""
    out: dict[str, list[list[Any]]] = {}
    for task, name in primary.items():
        if name is None or task not in samples:
            continue
        metric, _, flt = name.partition(",")
        rows: dict[tuple[Any, Any], float] = {}
        for sample in samples[task]:
            if sample.get("filter", "none") != (flt or "none"):
                continue
            value, key = _finite(sample.get(metric)), (sample.get("doc_id"), sample.get("doc_hash"))
            if value is None or key in rows:
                rows = {}
                break
            rows[key] = value
        if rows:
            out[task] = [[doc_id, doc_hash, value] for (doc_id, doc_hash), value in rows.items()]
    return out


def row_from_results(out: Mapping[str, Any], tasks: Sequence[str]) -> dict[str, Any]:
    """The flat store fields from one simple_evaluate result (accuracy + config['lowrank'])."""
    metrics, acc, names, errs = extract_metrics(out.get("results", {}), tasks)
    info = out.get("config", {}).get("lowrank", {}) or {}
    dec = info.get("decomposition", {}) or {}
    lat = info.get("latency", {}) or {}
    en = info.get("energy", {}) or {}
    mem = info.get("memory", {}) or {}
    accs = [a for a in acc.values() if a is not None]
    tokens = lat.get("tokens") or 0
    total = _finite(lat.get("total_seconds"))
    return {
        "metrics": metrics,
        "accuracy": acc,
        "primary_metric": names,
        "accuracy_stderr": errs,
        "mean_accuracy": sum(accs) / len(accs) if accs else None,
        "method": dec.get("method"),
        "layout": dec.get("layout"),
        "params_before": dec.get("params_before"),
        "params_after": dec.get("params_after"),
        "param_reduction": float(dec.get("param_reduction") or 0.0),
        "modules": len(dec.get("modules") or []),
        "decomposition_seconds": float(dec.get("decomposition_seconds") or 0.0),
        "decomposition_cache_hit": bool((dec.get("cache") or {}).get("hit", False)),
        "load_seconds": _finite(dec.get("load_seconds")),
        "latency_seconds": total,
        "tokens": tokens,
        "tokens_per_second": _finite(lat.get("tokens_per_second")),
        "seconds_per_token": (total / tokens) if (total is not None and tokens) else None,
        # every timed call, in order: rows at the same limit and batch size pair call by call (latency_stats)
        "latency_calls": {k: lat[k] for k in ("per_call_seconds", "per_call_tokens", "per_call_input_tokens", "warmup_calls") if k in lat} if "per_call_seconds" in lat else None,
        "energy_available": bool(en.get("available")),
        "energy_joules": _finite(en.get("total_joules")),
        "joules_per_token": _finite(en.get("joules_per_token")),
        "energy_reason": en.get("reason"),
        "energy_method": en.get("method"),  # nvml_* (the GPU) or rapl_energy_counter (the CPU packages)
        "memory_bytes": mem.get("bytes"),
        "memory_kind": mem.get("kind"),
        "versions": info.get("versions"),
    }


def run_sweep(runner: Runner, grid: Sequence[SweepConfig], limit: int | None) -> list[dict[str, Any]]:
    """Evaluate every configuration not yet finished in the store; returns all rows of the grid."""
    rows: dict[int, dict[str, Any]] = {}
    later: list[tuple[int, SweepConfig]] = []  # being evaluated by another sweep on this store: its row, at the end
    for i, cfg in enumerate(grid, 1):
        key = runner.key(cfg.spec_args(), limit)
        runner.store.refresh()
        stored = runner.stored_row(key)
        if stored is not None:
            runner.log(f"[{i}/{len(grid)}] {cfg.label}: in store, skipped")
            rows[i] = stored
            continue
        if runner.store.held_elsewhere(key):
            runner.log(f"[{i}/{len(grid)}] {cfg.label}: being evaluated by another process on this store; its row is taken at the end")
            later.append((i, cfg))
            continue
        rows[i] = _evaluate_config(runner, i, len(grid), cfg, limit)
    for i, cfg in later:  # waits for the other process's row (or evaluates, if it failed)
        rows[i] = _evaluate_config(runner, i, len(grid), cfg, limit)
    return [rows[i] for i in sorted(rows)]


def _evaluate_config(runner: Runner, i: int, n: int, cfg: SweepConfig, limit: int | None) -> dict[str, Any]:
    runner.log(f"[{i}/{n}] {cfg.label} ...")
    row = runner.evaluate(cfg.spec_args(), limit, label=cfg.label, phase="sweep", meta={"axis": cfg.axis, "layer_set": cfg.layer_set, "tensor_group": cfg.tensor_group})
    if row.get("status") == "ok":
        accs = " ".join(f"{t}={a:.3f}" for t, a in row["accuracy"].items() if a is not None)
        runner.log(f"    {accs} reduction={100 * row['param_reduction']:.2f}% wall={row['wall_seconds']:.1f}s")
    return row
