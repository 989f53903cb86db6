"""Side-by-side comparison of lm-eval results: accuracy and the efficiency block.

Reads the results JSON (or output folders) that ``lm_eval --model hf-tucker`` wrote and
lines up, for two or more runs: each task's primary metric (same rule as the gate) with
lm-eval's standard error, each later run's drop from the first with a confidence interval,
parameter reduction, latency (with p50 / p90 per batch, and each later run's latency ratio to the first with a
confidence interval, paired over batches), tokens/s, energy (or "n/a: <reason>") and peak memory.
Pure Python: no torch import.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .gate import DropNoise, ResultsFile, choose_metric, drop_noise, is_higher_better, load_results, metric_drop, metric_number, samples_path
from .latency_stats import latency_ratio


def _lowrank(res: Any) -> dict[str, Any]:
    return (res.data.get("config") or {}).get("lowrank") or {}


def _fmt_num(v: Any, fmt: str, unit: str = "", scale: float = 1.0) -> str:
    """``v * scale`` formatted, then ``unit``; "n/a" alone for a missing value (not 0, not "n/a s")."""
    return "n/a" if v is None else format(v * scale, fmt) + unit


def _fmt_count(v: Any) -> str:
    """A count with thousands separators, as an int even when the JSON stored it as a float."""
    return "n/a" if v is None else f"{round(v):,}"


def _level(confidence: float) -> str:
    """The interval's level as a percentage that keeps its digits (0.999 -> 99.9%, not 100%)."""
    return f"{round(100 * confidence, 6):g}%"


class UnknownTaskError(ValueError):
    """``tasks`` names a task the reference run does not have."""


ENERGY_SOURCES = {"nvml_energy_counter": "GPU, NVML", "nvml_power_sampling": "GPU, NVML sampled", "rapl_energy_counter": "CPU, RAPL"}


def _energy(low: dict[str, Any]) -> tuple[str, str]:
    e = low.get("energy") or {}
    if not e:
        return "n/a: not an hf-tucker run", "n/a"
    if not e.get("available"):
        return f"n/a: {str(e.get('reason') or 'unavailable').split(' (')[0]}", "n/a"  # the details stay in the JSON
    source = ENERGY_SOURCES.get(str(e.get("method")), "")  # GPU and CPU-package energy are not comparable
    suffix = f" ({source})" if source else ""
    return f"{e['total_joules']:.1f} J{suffix}", _fmt_num(e.get("joules_per_token"), ".4f", " J" + suffix)


def _decomposition_time(low: dict[str, Any]) -> str:
    """Seconds spent decomposing; a cache hit says so, with what computing it had cost."""
    dec = low.get("decomposition") or {}
    if not dec.get("modules"):
        return "none"
    seconds = dec.get("decomposition_seconds")
    text = "n/a" if seconds is None else f"{seconds:.2f} s" if seconds >= 0.1 else f"{seconds:.3f} s"
    cache = dec.get("cache") or {}
    if cache.get("hit"):
        computed = cache.get("original_decomposition_seconds")
        text += " (cache hit" + ("" if computed is None else f"; computed in {computed:.2f} s") + ")"
    return text


def _label(res: Any) -> str:
    dec = _lowrank(res).get("decomposition") or {}
    if not dec.get("modules"):
        return "dense"
    rank = str(dec.get("rank") or "budget").replace("|", ",")  # a per-tensor rank (8|q:4): '|' splits Markdown cells
    return f"{dec.get('method')} r={rank} L={','.join(map(str, dec.get('layers', [])))}"


def _value_cell(run: ResultsFile, task: str, metric: str) -> str:
    entry = run.entry(task) or {}
    value = metric_number(entry.get(metric))
    if value is None:
        return "n/a"
    name, flt = metric.split(",", 1)
    stderr = metric_number(entry.get(f"{name}_stderr,{flt}"))
    return f"{value:.4f}" + ("" if stderr is None else f" ± {stderr:.4f}")


def _task_drop(
    reference: ResultsFile, run: ResultsFile, task: str, metric: str, notes: list[str] | None = None, who: str = "run"
) -> tuple[float, DropNoise | None, bool] | None:
    """(drop, its standard error or None, whether the metric is an accuracy: higher is better, in 0..1), or None
    without both values. The drop is positive when the run is worse, whichever way the metric points; its error is
    paired over documents when both runs logged their samples, else from lm-eval's two standard errors. Why an
    interval shown is not the paired one (samples that cannot pair, zero stderrs) is appended to ``notes``."""
    base, comp = metric_number((reference.entry(task) or {}).get(metric)), metric_number((run.entry(task) or {}).get(metric))
    if base is None or comp is None:
        return None
    higher = is_higher_better(task, metric.split(",")[0], (reference, run))
    noise, note = drop_noise(task, metric, reference, run, base, comp)
    # Why an interval is not the paired one; and why there is none where both runs logged samples that did not pair.
    if notes is not None and note and (noise is not None or all(samples_path(f, task) is not None for f in (reference, run))):
        notes.append(f"{task}, {who}: {note}")
    return metric_drop(base, comp, higher, relative=False), noise, higher and 0.0 <= min(base, comp) <= max(base, comp) <= 1.0


def _interval_cell(drop: float, stderr: float | None, z: float, source: str) -> str:
    if stderr is None:
        return f"{drop:+.4f}"
    return f"{drop:+.4f} [{drop - z * stderr:+.4f}, {drop + z * stderr:+.4f}] ({source})"


def _drop_cell(
    reference: ResultsFile, run: ResultsFile, task: str, metric: str, z: float, notes: list[str] | None = None, who: str = "run"
) -> str:
    got = _task_drop(reference, run, task, metric, notes, who)
    if got is None:
        return "n/a"
    drop, noise, _ = got
    source = "" if noise is None else f"paired, {noise.documents} docs" if noise.kind == "paired" else "unpaired"
    return _interval_cell(drop, None if noise is None else noise.stderr, z, source)


def _mean_drop_cell(drops: list[tuple[float, DropNoise | None, bool]], z: float) -> str:
    """The mean of the accuracy-like tasks' drops; its error adds theirs in quadrature (the tasks' documents differ)."""
    acc = [(d, n) for d, n, accuracy in drops if accuracy]
    if len(acc) < 2:
        return "n/a"
    mean = sum(d for d, _ in acc) / len(acc)
    if any(n is None for _, n in acc):
        return f"{mean:+.4f}"
    stderr = math.sqrt(sum(n.stderr**2 for _, n in acc if n is not None)) / len(acc)
    kinds = {n.kind for _, n in acc if n is not None}
    return _interval_cell(mean, stderr, z, f"{len(acc)} tasks, {'/'.join(sorted(kinds))}")


def _percentile_cell(low: dict[str, Any]) -> str:
    p = (low.get("latency") or {}).get("seconds_per_batch_percentiles")
    return "n/a" if not p else f"{1000 * p['p50']:.1f} / {1000 * p['p90']:.1f} ms"


def comparison_rows(
    paths: Sequence[str | Path], tasks: Sequence[str] | None = None, confidence: float = 0.95, notes: list[str] | None = None
) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of a side-by-side table for the given runs (the first is the reference). Each task's metric
    shows lm-eval's standard error; with more than one run, a second row gives each later run's drop from the
    reference with its two-sided ``confidence`` interval. ``notes``, when given, receives why an interval is not
    paired over documents. A task in ``tasks`` the reference lacks raises :class:`UnknownTaskError`."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence:g} is invalid: give a level in (0, 1), e.g. 0.95")
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    runs = [load_results(p) for p in paths]
    header = ["", *[_label(r) for r in runs]]
    offered = list(runs[0].data.get("results", {}))
    names = list(tasks) if tasks else offered
    unknown = [t for t in names if t not in offered]
    if unknown:  # a typo would otherwise just drop the row
        raise UnknownTaskError(f"{', '.join(map(repr, unknown))}: not a task of the first run; it has {', '.join(offered) or 'none'}")
    if notes is not None:  # a task a later run lacks shows n/a; say which, so a mismatched pair is not read as data
        for i, r in enumerate(runs[1:], 2):
            absent = [t for t in names if t not in r.data.get("results", {})]
            if absent:
                notes.append(f"run {i} ({_label(r)}) has no results for {', '.join(absent)}: its cells read n/a")
    rows: list[list[str]] = []
    subtasks = {child for children in runs[0].group_subtasks.values() for child in children}
    top_drops: list[list[tuple[float, DropNoise | None, bool]]] = [[] for _ in runs[1:]]  # per later run
    for task in names:
        entry = runs[0].entry(task)
        metric = choose_metric(entry) if entry else None
        if metric is None:
            continue
        rows.append([f"{task} {metric.split(',')[0]}", *[_value_cell(r, task, metric) for r in runs]])
        if len(runs) > 1:
            rows.append([f"  drop, {_level(confidence)} interval", "-", *[_drop_cell(runs[0], r, task, metric, z, notes, f"run {i} ({_label(r)})") for i, r in enumerate(runs[1:], 2)]])
            if task not in subtasks:  # a group's subtasks are in its own score already
                for acc, r in zip(top_drops, runs[1:]):
                    got = _task_drop(runs[0], r, task, metric)
                    if got is not None:
                        acc.append(got)
    if len(runs) > 1 and any(sum(a for _, _, a in d) >= 2 for d in top_drops):
        rows.append([f"mean drop of the accuracies, {_level(confidence)} interval", "-", *[_mean_drop_cell(d, z) for d in top_drops]])
    lows = [_lowrank(r) for r in runs]

    def add(name: str, fn) -> None:
        rows.append([name, *[fn(low) for low in lows]])

    add("params", lambda low: _fmt_count((low.get("decomposition") or {}).get("params_after")))
    add("param reduction", lambda low: _fmt_num((low.get("decomposition") or {}).get("param_reduction"), ".2f", " %", 100))
    add("decomposition time", _decomposition_time)
    add("forward latency (total)", lambda low: _fmt_num((low.get("latency") or {}).get("total_seconds"), ".2f", " s"))
    add("latency per batch", lambda low: _fmt_num((low.get("latency") or {}).get("mean_seconds_per_batch"), ".1f", " ms", 1000))
    add("latency p50 / p90 per batch", _percentile_cell)
    if len(runs) > 1:
        rows.append([f"  latency ratio, {_level(confidence)} interval", "-", *[_latency_ratio_cell(lows[0], low, confidence) for low in lows[1:]]])
    add("tokens/s", lambda low: _fmt_num((low.get("latency") or {}).get("tokens_per_second"), ".1f"))
    add("energy", lambda low: _energy(low)[0])
    add("energy per token", lambda low: _energy(low)[1])
    add("peak memory", lambda low: _fmt_num((low.get("memory") or {}).get("bytes"), ".0f", f" MiB ({(low.get('memory') or {}).get('kind')})", 2**-20))
    return header, rows


def _latency_ratio_cell(reference: dict[str, Any], low: dict[str, Any], confidence: float) -> str:
    got = latency_ratio(reference.get("latency") or {}, low.get("latency") or {}, confidence)
    if isinstance(got, str):
        return f"n/a: {got}"
    lengths = "" if got.same_output else "; the generated lengths differ, so this is the time to answer the same prompts"
    warmup = "; one run warmed up and the other did not, so the first batch is left out of both" if got.first_call_dropped else ""
    return f"{got.ratio:.3f} [{got.lower:.3f}, {got.upper:.3f}] (paired, {got.calls} batches{lengths}{warmup})"


def format_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    return "\n".join(lines)
