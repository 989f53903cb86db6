"""From a sweep store to a Markdown table and PNG plots (matplotlib, Agg backend).

Plots follow the research's figures: accuracy against parameter reduction per task;
latency, energy and memory against reduction (relative to the dense baseline); and
sensitivity bars, the accuracy drop when a single layer (all its tensors) or a single
tensor (in every layer) is decomposed.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from .latency_stats import LatencyRatio, latency_ratio
from .store import Store

INTERVAL_LEVEL = 0.95  # two-sided, for the paired interval of each drop


class ReportError(ValueError):
    """The store cannot be reported on (one line)."""


class GroupKey(NamedTuple):
    """What rows must share to compare: the model, its other model_args (dtype, ...), the tasks and the limit."""

    model: str
    args: tuple[tuple[str, str], ...]
    tasks: tuple[str, ...]
    limit: Any

    def order(self) -> tuple:
        return (self.tasks, self.limit or 0, self.model, self.args)

    def model_label(self) -> str:
        return self.model + "".join(f", {k}={v}" for k, v in self.args)

    def describe(self, with_model: bool) -> str:
        where = f"{', '.join(self.tasks)}; limit {self.limit if self.limit is not None else 'all'}"
        return f"{self.model_label()}; {where}" if with_model else where


def _other_args(row: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    """The row's model_args that are neither ``pretrained`` nor its decomposition spec."""
    spec = row.get("spec") or {}
    pairs = (p.split("=", 1) for p in str(row.get("model_args") or "").split(",") if "=" in p)
    return tuple(sorted((k, v) for k, v in pairs if k != "pretrained" and k not in spec))


def _groups(rows: Sequence[Mapping[str, Any]]) -> dict[GroupKey, list[Mapping[str, Any]]]:
    """Rows grouped by model, other model_args, tasks and limit: only rows of one model evaluated on the same
    documents compare (a store may hold several models' sweeps)."""
    out: dict[GroupKey, list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        out[GroupKey(str(r.get("model") or ""), _other_args(r), tuple(sorted(r.get("tasks") or [])), r.get("limit"))].append(r)
    return out


def _many_models(groups: Mapping[GroupKey, Any]) -> bool:
    return len({(k.model, k.args) for k in groups}) > 1


def _dense(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    return next((r for r in rows if not r.get("spec")), None)


def _comparable(dense: Mapping[str, Any], row: Mapping[str, Any], task: str) -> bool:
    """Both rows scored ``task``, on the same metric (a store may hold rows written when sweeps scored ARC on acc
    beside newer ones on acc_norm)."""
    if (dense.get("accuracy") or {}).get(task) is None or (row.get("accuracy") or {}).get(task) is None:
        return False
    return (dense.get("primary_metric") or {}).get(task) == (row.get("primary_metric") or {}).get(task)


def _pct(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def _num(x: Any, fmt: str = "{:.3f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def _rel(row: Mapping[str, Any], dense: Mapping[str, Any], key: str) -> float | None:
    a, b = row.get(key), dense.get(key)
    if a is None or b in (None, 0):
        return None
    return a / b - 1.0


def _spec_cols(row: Mapping[str, Any]) -> tuple[str, str, str]:
    s = row.get("spec") or {}
    if not s:
        return "-", "-", "-"
    return str(s.get("rank")), str(s.get("layers", "all")), str(s.get("tensors", "all"))


def _interval(dense: Mapping[str, Any], row: Mapping[str, Any], z: float) -> str:
    """The mean drop's two-sided interval in points, paired over the documents both rows scored."""
    from .search import paired_drop_bounds

    if row is dense:
        return "-"
    if (dense.get("primary_metric") or {}) != (row.get("primary_metric") or {}):
        return "n/a"  # scored on other metrics (an older store)
    bounds, _ = paired_drop_bounds(dense, row, "mean", z)
    return "n/a" if bounds is None else f"{100 * bounds[0]:+.1f} .. {100 * bounds[1]:+.1f}"


def latency_interval(row: Mapping[str, Any], dense: Mapping[str, Any]) -> LatencyRatio | None:
    """The row's latency ratio to dense with its paired interval, where both kept their timed calls and timed the
    same batches."""
    if row is dense or not (row.get("latency_calls") and dense.get("latency_calls")):
        return None
    got = latency_ratio(dense["latency_calls"], row["latency_calls"], INTERVAL_LEVEL)
    return got if isinstance(got, LatencyRatio) else None


def _latency_change(row: Mapping[str, Any], dense: Mapping[str, Any]) -> str:
    """The change in seconds per token against dense, with its paired interval where there is one."""
    cell = _pct(_rel(row, dense, "seconds_per_token"), 1)
    got = latency_interval(row, dense) if cell != "n/a" else None
    return cell if got is None else f"{cell} [{100 * (got.lower - 1):+.1f}, {100 * (got.upper - 1):+.1f}]"


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """One table per (tasks, limit) group, dense first, then by parameter reduction. Where the dense row and
    others kept each document's score (``sweep --doc-scores``), each mean drop gets its paired interval."""
    z = statistics.NormalDist().inv_cdf(0.5 + INTERVAL_LEVEL / 2)
    parts: list[str] = []
    groups = _groups(rows)
    many = _many_models(groups)
    for key, group in sorted(groups.items(), key=lambda kv: kv[0].order()):
        tasks, limit = key.tasks, key.limit
        dense = _dense(group)
        paired = dense is not None and "doc_scores" in dense and any("doc_scores" in r for r in group if r is not dense)
        model = f"model: {key.model_label()}; " if many else ""
        parts.append(f"### {model}tasks: {', '.join(tasks)}; limit: {limit if limit is not None else 'all'} documents per task\n")
        head = ["config", "rank", "layers", "tensors", "param cut"]
        head += [f"{t} ({(dense or group[0]).get('primary_metric', {}).get(t) or '-'})" for t in tasks]
        head += ["mean drop (pts)"] + ([f"{INTERVAL_LEVEL:.0%} interval (pts)"] if paired else [])
        head += ["latency (s)", "Δlatency", "tok/s", "energy (J)", "peak mem (MiB)", "decomp (s)"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        ordered = sorted(group, key=lambda r: (bool(r.get("spec")), r.get("param_reduction") or 0.0, r.get("label", "")))
        for r in ordered:
            rank, layers, tensors = _spec_cols(r)
            accs = [_num((r.get("accuracy") or {}).get(t)) for t in tasks]
            drop = None
            if dense is not None:
                ds = [dense["accuracy"][t] - r["accuracy"][t] for t in tasks if _comparable(dense, r, t)]
                drop = sum(ds) / len(ds) if ds else None
            energy = _num(r.get("energy_joules"), "{:.1f}") if r.get("energy_available") else "n/a"
            mem = r.get("memory_bytes")
            cells = [
                str(r.get("label", "")),
                rank,
                layers,
                tensors,
                _pct(r.get("param_reduction")),
                *accs,
                _num(None if drop is None else 100 * drop, "{:+.1f}"),
                *([_interval(dense, r, z)] if paired and dense is not None else []),
                _num(r.get("latency_seconds"), "{:.1f}"),
                _latency_change(r, dense) if dense else "n/a",
                _num(r.get("tokens_per_second"), "{:.1f}"),
                energy,
                _num(None if mem is None else mem / 2**20, "{:.0f}"),
                _num(r.get("decomposition_seconds"), "{:.1f}"),
            ]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def _plt() -> Any:
    from .optional import require_module

    require_module("matplotlib", "plots", "plotting")
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def score_stderr(row: Mapping[str, Any], task: str) -> float | None:
    """The standard error of a row's score on ``task`` from its documents' scores (``sweep --doc-scores``)."""
    listed = (row.get("doc_scores") or {}).get(task)
    if not listed or len(listed) < 2:
        return None
    return statistics.stdev(float(v) for _, _, v in listed) / math.sqrt(len(listed))


def _accuracy_plot(plt: Any, group: Sequence[Mapping[str, Any]], tasks: Sequence[str], path: Path, title: str) -> None:
    """Accuracy against parameter reduction; where the rows kept their documents' scores, 95 % error bars."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"single-layer": "o", "single-tensor": "s", "layer-set": "^", "tensor-group": "D", "mixed": "x"}
    z = statistics.NormalDist().inv_cdf(0.5 + INTERVAL_LEVEL / 2)
    for i, task in enumerate(tasks):
        color = f"C{i}"
        for axis, marker in markers.items():
            chosen = [r for r in group if r.get("spec") and r.get("axis", "mixed") == axis and r["accuracy"].get(task) is not None]
            if chosen:
                xs = [100 * r["param_reduction"] for r in chosen]
                ys = [100 * r["accuracy"][task] for r in chosen]
                ax.scatter(xs, ys, color=color, marker=marker, alpha=0.75, label=f"{task}: {axis}")
                bars = [(x, y, 100 * z * se) for x, y, se in zip(xs, ys, (score_stderr(r, task) for r in chosen)) if se is not None]
                if bars:
                    bx, by, err = zip(*bars)
                    ax.errorbar(bx, by, yerr=err, fmt="none", ecolor=color, alpha=0.4, capsize=2)
        dense = _dense(group)
        if dense and dense["accuracy"].get(task) is not None:
            ax.axhline(100 * dense["accuracy"][task], color=color, ls="--", lw=1, label=f"{task}: dense")
            ax.scatter([0.0], [100 * dense["accuracy"][task]], color=color, marker="*", s=120)
    ax.set_xlim(left=-0.5)
    ax.set_xlabel("parameter reduction (%)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _efficiency_plot(plt: Any, group: Sequence[Mapping[str, Any]], path: Path, title: str) -> None:
    """Latency, energy and memory change against parameter reduction; latency with its paired 95 % error bars
    where the rows kept their timed calls."""
    dense = _dense(group)
    comp = [r for r in group if r.get("spec")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    panels = [("seconds_per_token", "latency change vs dense (%)", "latency (s/token)"), ("joules_per_token", "energy change vs dense (%)", "energy (J/token)"), ("memory_bytes", "peak memory change vs dense (%)", "memory")]
    for ax, (key, ylabel, name) in zip(axes, panels):
        pts = []
        for r in comp:
            if key == "joules_per_token" and not r.get("energy_available"):
                continue
            rel = _rel(r, dense, key) if dense else None
            if rel is not None:
                interval = latency_interval(r, dense) if key == "seconds_per_token" and dense else None
                pts.append((100 * r["param_reduction"], 100 * rel, interval))
        if pts:
            xs, ys, _ = zip(*pts)
            ax.scatter(xs, ys, alpha=0.75)
            bars = [(x, y, 100 * (i.ratio - i.lower), 100 * (i.upper - i.ratio)) for x, y, i in pts if i is not None]
            if bars:
                bx, by, below, above = zip(*bars)
                ax.errorbar(bx, by, yerr=[below, above], fmt="none", ecolor="C0", alpha=0.4, capsize=2)
            hi = max(xs)
            ax.plot([0, hi], [0, -0.5 * hi], ls=":", color="grey", label="paper: -0.5% per 1% params")
            ax.plot([0, hi], [0, -hi], ls="--", color="lightgrey", label="proportional: -1% per 1%")
            ax.legend(fontsize=7)
        else:
            reason = (dense or {}).get("energy_reason") if key == "joules_per_token" else "no data"
            ax.text(0.5, 0.5, f"{name} unavailable\n({reason})", ha="center", va="center", transform=ax.transAxes, fontsize=9)
            ax.set_yticks([])
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xlabel("parameter reduction (%)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _sensitivity_plot(plt: Any, group: Sequence[Mapping[str, Any]], tasks: Sequence[str], axis: str, path: Path, title: str) -> bool:
    dense = _dense(group)
    rows = [r for r in group if r.get("axis") == axis]
    if not rows or dense is None:
        return False
    # one series per (rank, the other axis), bars per layer / tensor
    series: dict[str, dict[str, float]] = defaultdict(dict)
    for r in rows:
        s = r["spec"]
        other = s.get("tensors", "all") if axis == "single-layer" else s.get("layers", "all")
        ds = [dense["accuracy"][t] - r["accuracy"][t] for t in tasks if _comparable(dense, r, t)]
        if ds:
            series[f"rank {s.get('rank')}" + (f", {other}" if other != "all" else "")][str(s["layers"] if axis == "single-layer" else s["tensors"])] = 100 * sum(ds) / len(ds)
    if not series:
        return False
    cats = sorted({c for v in series.values() for c in v}, key=lambda c: (0, int(c)) if c.isdigit() else (1, c))
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(cats) * len(series) + 2), 4))
    width = 0.8 / len(series)
    for i, (name, vals) in enumerate(sorted(series.items())):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(cats))]
        ax.bar(xs, [vals.get(c, math.nan) for c in cats], width=width, label=name)  # NaN: no bar for a config not evaluated, not a drop of 0
    ax.set_xticks(range(len(cats)))
    ax.set_xticklabels(cats)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xlabel("decomposed layer (1-based, all tensors)" if axis == "single-layer" else "decomposed tensor (in every layer)")
    ax.set_ylabel("mean accuracy drop vs dense (points)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(store_path: str | Path, out_dir: str | Path, plots: bool | None = None) -> list[Path]:
    """Write ``report.md`` and the PNG plots into ``out_dir``; returns the files written.

    ``plots``: True needs matplotlib; None (default) draws them when matplotlib is installed and otherwise writes
    the table alone, saying so in the report."""
    import importlib.util

    store = Store.open(store_path, create=False)
    rows = [r for r in store.rows() if r.get("accuracy") is not None]
    if not rows:
        raise ReportError(f"store {str(store_path)!r} holds no finished rows")
    no_plots = None
    if plots is None and importlib.util.find_spec("matplotlib") is None:
        plots, no_plots = False, "No plots: matplotlib is not installed (pip install 'lm-eval-lowrank[plots]')."
    plt = _plt() if plots is not False else None  # before any file is written: a missing matplotlib is one line
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    groups = _groups(rows)
    md = ["# Low-rank sweep report", "", f"Store: `{Path(store_path).name}`, {len(rows)} finished rows.", ""]
    md.append("Accuracy columns are each task's primary metric (the gate's and compare's: acc_norm where the task has it, else acc, ...); a row scored on another metric (an older store) is left out of the mean drop. 'mean drop' is dense minus config, in points, averaged over tasks; where the rows kept each document's score (`sweep --doc-scores`), its two-sided 95 % interval is paired over the documents both scored. Δlatency is the change in seconds per token against the dense row of the same table; where the rows kept their timed calls, its 95 % interval (in %) is paired over the batches both timed, from blocks of consecutive calls. Energy is n/a where no counter is available (CPU).\n")
    md.append(markdown_table(rows))
    if no_plots:
        md.append(no_plots + "\n")
    plotted = sorted(groups.items(), key=lambda kv: kv[0].order()) if plt is not None else []
    many = _many_models(groups)
    for gi, (key, group) in enumerate(plotted):
        tasks = key.tasks
        suffix = "" if len(groups) == 1 else f"_{gi + 1}"
        where = key.describe(many)
        files = []
        p = out / f"accuracy_vs_reduction{suffix}.png"
        _accuracy_plot(plt, group, tasks, p, f"Accuracy vs parameter reduction\n({where})")
        files.append(p)
        p = out / f"efficiency_vs_reduction{suffix}.png"
        _efficiency_plot(plt, group, p, f"Latency, energy, memory vs parameter reduction ({where})")
        files.append(p)
        for axis, stem, what in (("single-layer", "layer_sensitivity", "single layer"), ("single-tensor", "tensor_sensitivity", "single tensor")):
            p = out / f"{stem}{suffix}.png"
            if _sensitivity_plot(plt, group, tasks, axis, p, f"Accuracy drop when one {what} is decomposed\n({where})"):
                files.append(p)
        md.append(f"## Plots ({where})\n")
        md += [f"![{f.stem}]({f.name})\n" for f in files]
        written += files
    report = out / "report.md"
    report.write_text("\n".join(md), encoding="utf-8")
    return [report, *written]
