"""Accuracy gate: compare a compressed run's lm-eval results against a dense baseline.

Pure Python on purpose (no torch, no lm_eval import): CI runs the gate on a small
runner after the evaluations, and it must start in well under a second.

Input format (lm-evaluation-harness 0.4.x, checked against 0.4.13):

* ``lm_eval --output_path DIR`` writes ``DIR/<model_name_sanitized>/results_<date_id>.json``
  where ``date_id = datetime.now().isoformat().replace(":", "-")``;
  ``--output_path FILE.json`` writes ``FILE_<date_id>.json`` next to it.
* The JSON holds ``results`` (every task *and* group, each a mapping with ``alias``,
  ``name``, ``sample_len`` and ``"<metric>,<filter>"`` keys such as ``acc,none``,
  ``acc_stderr,none`` or ``exact_match,strict-match``), ``groups`` (only the groups
  that aggregate metrics), ``group_subtasks`` (group -> direct children),
  ``higher_is_better`` (task -> metric name -> bool or None), ``n-shot`` and ``n-samples``.

Primary metric per task (first rule that applies):

1. ``--metric TASK=METRIC`` for that task (``METRIC`` may carry a filter: ``exact_match,flexible-extract``);
2. ``--metric METRIC`` for every task that reports it;
3. the first of :data:`PREFERRED_METRICS` the task reports in the baseline;
4. the first metric the task reports (lm-eval keeps the task's ``metric_list`` order).

Within a metric the filter is ``none`` if present, else ``strict-match``, else the first one.
Direction comes from the baseline's ``higher_is_better`` (then the compressed file's), and
for metrics it does not cover from :data:`LOWER_IS_BETTER`; "drop" is the decrease of a
higher-is-better metric and the increase of a lower-is-better one (perplexity, bits_per_byte).
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

__all__ = [
    "EXIT_FAIL",
    "EXIT_OK",
    "EXIT_USAGE",
    "LOWER_IS_BETTER",
    "PREFERRED_METRICS",
    "GateError",
    "DropNoise",
    "GateResult",
    "ResultsFile",
    "Row",
    "choose_metric",
    "format_table",
    "load_results",
    "parse_max_drop",
    "parse_metric_options",
    "parse_tasks",
    "resolve_results_path",
    "run_gate",
    "select_tasks",
    "to_json",
]

EXIT_OK = 0  # every gated task within tolerance
EXIT_FAIL = 1  # at least one task dropped too far, or is missing from a file
EXIT_USAGE = 2  # bad option, unreadable/foreign input: the gate could not be evaluated

# Headline metrics in the order we pick them. acc_norm before acc: where a task reports
# both (ARC, HellaSwag, PIQA, OpenBookQA) the length-normalised score is the one papers
# and the Open LLM Leaderboard quote, and it is less sensitive to answer-length bias.
PREFERRED_METRICS: tuple[str, ...] = (
    "acc_norm",
    "acc",
    "exact_match",
    "em",
    "f1",
    "mcc",
    "pass@1",
    "bleu",
    "rougeL",
    "word_perplexity",
    "perplexity",
    "byte_perplexity",
    "bits_per_byte",
)

# Used only when the results file gives no direction for a metric.
LOWER_IS_BETTER: frozenset[str] = frozenset(
    {"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte", "ter", "wer", "cer", "brier_score"}
)

PREFERRED_FILTERS: tuple[str, ...] = ("none", "strict-match")

# Entry keys that are bookkeeping, not metrics.
_NON_METRIC_KEYS = frozenset({"alias", "name", "sample_len", "sample_count", "samples"})

# Slack for float rounding: 0.80 - 0.77 is 0.030000000000000027, which must still pass
# a 0.03 gate, while any real excess (>= 1e-9) fails.
_EPS = 1e-9

_STAMP_RE = re.compile(r"_(\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}(?:\.\d+)?)\.json$")


class GateError(Exception):
    """Input or usage problem: the gate cannot be evaluated (exit code 2)."""


# --------------------------------------------------------------------------- loading


def _stamp(path: Path) -> datetime | None:
    """The timestamp lm-eval put in the file name, or None if it has none."""
    m = _STAMP_RE.search(path.name)
    if not m:
        return None
    text = m.group(1)
    fmt = "%Y-%m-%dT%H-%M-%S.%f" if "." in text else "%Y-%m-%dT%H-%M-%S"
    try:
        return datetime.strptime(text, fmt)
    except ValueError:
        return None


def _newest(paths: Sequence[Path]) -> Path:
    # Files without a parseable stamp rank oldest; the name breaks ties deterministically.
    return max(paths, key=lambda p: (_stamp(p) or datetime.min, p.name))


def resolve_results_path(path: str | Path) -> tuple[Path, str | None]:
    """Map what the user passed to the results file to read, plus a note on how.

    Accepts a results file, the folder lm-eval wrote into (``--output_path``), the
    model folder inside it, or the ``--output_path x.json`` the user gave lm-eval
    (which actually wrote ``x_<timestamp>.json``).
    """
    path = Path(path)
    if path.is_file():
        return path, None
    if path.is_dir():
        found = sorted(path.glob("results_*.json"))
        if not found:
            found = sorted(p for sub in path.iterdir() if sub.is_dir() for p in sub.glob("results_*.json"))
            folders = sorted({p.parent.name for p in found})
            if len(folders) > 1:
                raise GateError(
                    f"{path}: holds results for several models ({', '.join(folders)}); pass the model's folder"
                )
        if not found:
            raise GateError(f"{path}: no lm-eval results_<timestamp>.json in this folder or its model subfolders")
        chosen = _newest(found)
        if len(found) == 1:
            return chosen, f"the only results file under {path}"
        return chosen, f"newest of {len(found)} results files in {chosen.parent}"
    if path.suffix == ".json" and path.parent.is_dir():
        found = sorted(p for p in path.parent.glob(f"{path.stem}_*.json") if _stamp(p) is not None)
        if found:
            chosen = _newest(found)
            return chosen, f"lm-eval wrote --output_path {path.name} as {path.stem}_<timestamp>.json; newest of {len(found)}"
    raise GateError(f"{path}: no such file or folder")


@dataclass(frozen=True)
class ResultsFile:
    """One lm-eval results JSON, as read."""

    path: Path
    requested: Path
    data: Mapping[str, Any]
    note: str | None = None

    @property
    def results(self) -> Mapping[str, Any]:
        return self.data["results"]

    @property
    def group_subtasks(self) -> Mapping[str, list[str]]:
        value = self.data.get("group_subtasks")
        return value if isinstance(value, Mapping) else {}

    @property
    def higher_is_better(self) -> Mapping[str, Mapping[str, Any]]:
        value = self.data.get("higher_is_better")
        return value if isinstance(value, Mapping) else {}

    @property
    def model_name(self) -> str | None:
        name = self.data.get("model_name")
        if isinstance(name, str):
            return name
        config = self.data.get("config")
        return str(config.get("model_args")) if isinstance(config, Mapping) and config.get("model_args") else None

    def entry(self, task: str) -> Mapping[str, Any] | None:
        value = self.results.get(task)
        return value if isinstance(value, Mapping) else None


def load_results(path: str | Path) -> ResultsFile:
    """Resolve and read a results file; raise :class:`GateError` naming the path on any problem."""
    requested = Path(path)
    resolved, note = resolve_results_path(requested)
    try:
        text = resolved.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise GateError(f"{resolved}: cannot read: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise GateError(f"{resolved}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise GateError(f"{resolved}: not an lm-eval results file (no 'results' mapping)")
    entries = [e for e in data["results"].values() if isinstance(e, Mapping)]
    if entries and not any(_metrics(e) for e in entries) and any(metric_number(v) is not None for e in entries for v in e.values()):
        raise GateError(f"{resolved}: its metrics have no ',filter' suffix (lm-eval before 0.4): give results written by lm-eval 0.4 or later")
    return ResultsFile(path=resolved, requested=requested, data=data, note=note)


# --------------------------------------------------------------------------- metrics


def _metrics(entry: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(key, metric, filter) for every metric value in a task entry, in file order."""
    out = []
    for key in entry:
        if key in _NON_METRIC_KEYS or "," not in key:
            continue
        metric, flt = key.split(",", 1)
        if metric.endswith("_stderr"):
            continue
        out.append((key, metric, flt))
    return out


def _pick_filter(keys: list[tuple[str, str, str]]) -> str:
    for flt in PREFERRED_FILTERS:
        for key, _, f in keys:
            if f == flt:
                return key
    return keys[0][0]


def choose_metric(entry: Mapping[str, Any], requested: str | None = None) -> str | None:
    """The ``metric,filter`` key to gate on for a task entry, or None if it has none.

    ``requested`` is ``metric`` or ``metric,filter``; when given, only it is considered.
    """
    keys = _metrics(entry)
    if requested is not None:
        if "," in requested:
            return requested if any(k == requested for k, _, _ in keys) else None
        matching = [k for k in keys if k[1] == requested]
        return _pick_filter(matching) if matching else None
    for name in PREFERRED_METRICS:
        matching = [k for k in keys if k[1] == name]
        if matching:
            return _pick_filter(matching)
    return _pick_filter([k for k in keys if k[1] == keys[0][1]]) if keys else None


def is_higher_better(task: str, metric: str, files: Iterable[ResultsFile]) -> bool:
    """Whether a higher ``metric`` (a name without its filter) is better for ``task``: the results' own
    ``higher_is_better`` first, else known lower-is-better names (perplexity, ...)."""
    for f in files:
        value = f.higher_is_better.get(task, {})
        value = value.get(metric) if isinstance(value, Mapping) else None
        if isinstance(value, bool):
            return value
    return metric not in LOWER_IS_BETTER


def metric_number(value: Any) -> float | None:
    """A metric value as a float, or None for anything that is not a number."""
    # bool is an int subclass but never a metric value; "N/A" and friends are not numbers.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


# --------------------------------------------------------------------------- options


def parse_tasks(values: Iterable[str]) -> list[str]:
    """``--tasks a,b --tasks c`` -> ``[a, b, c]`` (order kept, duplicates dropped)."""
    out: list[str] = []
    for value in values:
        names = [name.strip() for name in value.split(",")]
        if not any(names):  # --tasks '' gated every task, as if it were not given
            raise GateError(f"--tasks {value!r} names no task; give names separated by ',' (or leave --tasks out for all)")
        for name in names:
            if name and name not in out:
                out.append(name)
    return out


def parse_metric_options(values: Iterable[str]) -> tuple[str | None, dict[str, str]]:
    """``--metric acc_norm --metric gsm8k=exact_match,flexible-extract`` -> (default, per task)."""
    default: str | None = None
    per_task: dict[str, str] = {}
    for value in values:
        value = value.strip()
        task, sep, metric = value.partition("=")
        if sep:
            if not task.strip() or not metric.strip():
                raise GateError(f"--metric {value!r}: expected METRIC or TASK=METRIC")
            if per_task.get(task.strip(), metric.strip()) != metric.strip():
                raise GateError(f"--metric {task.strip()}= given twice ({per_task[task.strip()]!r}, {metric.strip()!r}); give each task one metric")
            per_task[task.strip()] = metric.strip()
        elif not value:
            raise GateError("--metric: empty value")
        elif default is not None and default != value:
            raise GateError(f"--metric given twice without a task ({default!r}, {value!r}); use TASK=METRIC")
        else:
            default = value
    return default, per_task


def _tolerance(text: str, where: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise GateError(f"--max-drop {where!r}: {text!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise GateError(f"--max-drop {where!r}: must be a finite number >= 0")
    return value


def parse_max_drop(values: Iterable[str]) -> tuple[float | None, dict[str, float]]:
    """``--max-drop 0.03 --max-drop wikitext=0.5`` -> (default, per task)."""
    default: float | None = None
    per_task: dict[str, float] = {}
    for value in values:
        task, sep, number = value.strip().partition("=")
        if sep:
            if not task.strip():
                raise GateError(f"--max-drop {value!r}: expected NUMBER or TASK=NUMBER")
            tolerance = _tolerance(number.strip(), value)
            if per_task.get(task.strip(), tolerance) != tolerance:
                raise GateError(f"--max-drop {task.strip()}= given twice ({per_task[task.strip()]:g}, {tolerance:g}); give each task one tolerance")
            per_task[task.strip()] = tolerance
        else:
            if default is not None:
                raise GateError("--max-drop given twice without a task; use TASK=NUMBER for per-task tolerances")
            default = _tolerance(value.strip(), value)
    return default, per_task


# --------------------------------------------------------------------------- selection


def _children(results: ResultsFile, name: str) -> list[str]:
    value = results.group_subtasks.get(name)
    return [str(c) for c in value] if isinstance(value, list) else []


def _has_metrics(results: ResultsFile, name: str) -> bool:
    entry = results.entry(name)
    return entry is not None and bool(_metrics(entry))


def _expand(results: ResultsFile, name: str, subtasks: bool, seen: set[str]) -> list[str]:
    """A name, or, for a group that aggregates nothing, its descendants that do."""
    if name in seen:  # guard against a malformed file with a cycle
        return []
    seen.add(name)
    children = _children(results, name)
    out: list[str] = []
    if _has_metrics(results, name) or not children:
        out.append(name)
        if not subtasks:
            return out
    for child in children:
        out.extend(_expand(results, child, subtasks, seen))
    return out


def select_tasks(baseline: ResultsFile, names: Sequence[str] = (), subtasks: bool = False) -> list[str]:
    """The task names to gate, in baseline order.

    Named tasks are kept as given (a missing one is reported MISSING later). Without
    names: every top-level entry of the baseline (groups that are nobody's child, plus
    stand-alone tasks), so a group and its subtasks are not gated twice. A group with
    no aggregated metric (lm-eval lists it with only an alias) stands for its subtasks.
    ``subtasks=True`` adds every subtask under each selected group.
    """
    if names:
        roots = list(names)
    else:
        child_names = {c for g in baseline.group_subtasks for c in _children(baseline, g)}
        roots = [name for name in baseline.results if name not in child_names]
    out: list[str] = []
    for root in roots:
        if root not in baseline.results:
            expanded = [root]
        else:
            expanded = _expand(baseline, root, subtasks, set())
        out.extend(n for n in expanded if n not in out)
    return out


# --------------------------------------------------------------------------- noise


@dataclass(frozen=True)
class DropNoise:
    """The standard error of one task's drop, in the drop's units."""

    stderr: float
    kind: str  # "paired": over the documents both runs scored; "unpaired": from lm-eval's stderr of each score
    documents: int | None = None  # paired documents
    # The error were the runs m documents long, where it does not shrink as 1/sqrt(m): the zero-spread errors
    # (Agresti and Min's, or two lm-eval stderrs of 0 floored) shrink about as 1/m. documents_to_decide solves on it.
    error_at: Callable[[int], float] | None = field(default=None, compare=False, repr=False)


def samples_path(results: ResultsFile, task: str) -> Path | None:
    """The per-document file ``lm_eval --log_samples`` wrote beside a results file for ``task``, if any."""
    m = _STAMP_RE.search(results.path.name)
    if m is None:
        return None
    path = results.path.parent / f"samples_{task}_{m.group(1)}.jsonl"
    return path if path.is_file() else None


def _read_per_document(path: Path, task: str, metric_key: str, parse: Callable[[Any], Any]) -> dict[tuple[Any, ...], Any] | None:
    """(task, doc_id, doc_hash) -> ``parse`` of the metric's logged value, for each document of a samples file;
    None when a line cannot be read, a value does not parse (None) or a document repeats."""
    name, flt = metric_key.split(",", 1)
    out: dict[tuple[Any, ...], Any] = {}
    try:
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                if not line.strip():
                    continue
                sample = json.loads(line)
                if sample.get("filter", "none") != flt:
                    continue
                value = parse(sample.get(name))
                key = (task, sample.get("doc_id"), sample.get("doc_hash"))
                if value is None or key in out:
                    return None
                out[key] = value
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return None
    return out or None


def _loglikelihood_and_count(raw: Any) -> tuple[float, float] | None:
    if not (isinstance(raw, list) and len(raw) == 2):
        return None
    ll, count = metric_number(raw[0]), metric_number(raw[1])
    return None if ll is None or count is None or count <= 0 else (ll, count)


def per_document_parts(results: ResultsFile, task: str, metric_key: str) -> dict[tuple[Any, ...], tuple[float, float]] | None:
    """(task, doc_id, doc_hash) -> (log-likelihood, words or bytes), where the samples file logs a corpus-level
    metric (lm-eval's word_perplexity, byte_perplexity, bits_per_byte) as that pair per document; else None."""
    path = samples_path(results, task)
    return None if path is None else _read_per_document(path, task, metric_key, _loglikelihood_and_count)


# Corpus-level aggregates of (log-likelihood, count) pairs, as functions of a = sum(ll) / sum(count): the value, and
# its derivative in a. lm-eval's weighted_perplexity is exp(-a); bits_per_byte is -a / ln 2.
_CORPUS_AGGREGATES: tuple[tuple[Callable[[float], float], Callable[[float], float]], ...] = (
    (lambda a: math.exp(-a), lambda a: -math.exp(-a)),
    (lambda a: -a / math.log(2), lambda a: -1 / math.log(2)),
)


def paired_corpus_stderr(
    base: Mapping[Any, tuple[float, float]], comp: Mapping[Any, tuple[float, float]], base_value: float, comp_value: float, metric: str
) -> tuple[float | None, str | None]:
    """(standard error of comp_value - base_value, None) for a corpus-level metric of both runs over the same
    documents, by the delta method with documents as the sampling unit: each document's influence on the
    difference is f'(a_c)(ll_c - a_c w) / W - f'(a_b)(ll_b - a_b w) / W, and the error is their spread. Else (None,
    why). The word (byte) counts must agree per document: the same texts, split the same way."""
    if base.keys() != comp.keys():
        return None, "the samples files cover different documents"
    if len(base) < 2:
        return None, "fewer than 2 documents in the samples files"
    if any(base[k][1] != comp[k][1] for k in base):
        return None, f"the runs count different words or bytes per document for {metric}"
    total = sum(w for _, w in base.values())
    a_b = sum(ll for ll, _ in base.values()) / total
    a_c = sum(ll for ll, _ in comp.values()) / total

    def close(x: float, y: float) -> bool:
        return abs(x - y) <= 1e-6 * max(1.0, abs(y))

    for value, slope in _CORPUS_AGGREGATES:
        try:
            if not (close(value(a_b), base_value) and close(value(a_c), comp_value)):
                continue
            g = [slope(a_c) * (comp[k][0] - a_c * w) / total - slope(a_b) * (ll - a_b * w) / total for k, (ll, w) in base.items()]
        except OverflowError:
            return None, f"{metric} overflows"
        n = len(g)
        stderr = math.sqrt(n / (n - 1) * sum(x * x for x in g))
        if not math.isfinite(stderr) or stderr == 0:
            return None, f"the samples files give no spread of {metric} to estimate an error from"
        return stderr, None
    return None, f"{metric} is neither a mean over documents nor a perplexity of their summed log-likelihoods"


def per_document_scores(results: ResultsFile, task: str, metric_key: str, _seen: frozenset[str] = frozenset()) -> dict[tuple[Any, ...], float] | None:
    """(task, doc_id, doc_hash) -> the metric's value on that document, from the samples file; for a group, over
    every document of its subtasks. None when a file is missing or does not hold exactly one number per document
    for this metric and filter."""
    path = samples_path(results, task)
    if path is None:
        children = results.group_subtasks.get(task)
        if not children or task in _seen:
            return None
        pooled: dict[tuple[Any, ...], float] = {}
        for child in children:
            scores = per_document_scores(results, child, metric_key, _seen | {task})
            if scores is None:
                return None
            pooled.update(scores)
        return pooled
    # a custom metric's True/False is 1/0
    return _read_per_document(path, task, metric_key, lambda raw: float(raw) if isinstance(raw, bool) else metric_number(raw))


def _is_their_mean(scores: Mapping[Any, float], reported: float) -> bool:
    """Whether the reported score is the mean of the per-document ones: only then is a paired standard error of
    the mean difference valid (not for corpus-level metrics such as perplexity or BLEU, nor for a group that
    averages its subtasks unweighted)."""
    return abs(statistics.fmean(scores.values()) - reported) <= 1e-6 * max(1.0, abs(reported))


def agresti_min_stderr(lost: float, gained: float, documents: float) -> float:
    """Agresti and Min's standard error of the mean paired 0/1 difference: half a document added to each cell of the
    2x2 table of (base, comp) answers, ``lost`` (1 -> 0) and ``gained`` (0 -> 1) of ``documents``. Counts may be
    fractional (scaled to another number of documents)."""
    n = documents + 2.0
    lost, gained = lost + 0.5, gained + 0.5
    mean = (lost - gained) / n
    return math.sqrt(((lost + gained) / n - mean * mean) / n)


def _paired_noise(
    base: Mapping[Any, float], comp: Mapping[Any, float], base_value: float, comp_value: float, metric: str, source: str
) -> tuple[float | None, str | None, tuple[int, int] | None]:
    """:func:`paired_drop_stderr`, plus (lost, gained) when the error came from the Agresti-Min branch."""
    if base.keys() != comp.keys():
        return None, f"{source} cover different documents", None
    if len(base) < 2:
        return None, f"fewer than 2 documents in {source}", None
    if not (_is_their_mean(base, base_value) and _is_their_mean(comp, comp_value)):
        return None, f"{metric} is not a mean over documents", None
    diffs = [base[k] - comp[k] for k in base]
    stderr = statistics.stdev(diffs) / math.sqrt(len(diffs))
    if not math.isfinite(stderr):
        return None, f"{source} hold a non-finite {metric}", None
    if stderr > 0:
        return stderr, None, None
    if not all(v in (0.0, 1.0) for scores in (base, comp) for v in scores.values()):
        return None, f"every document's {metric} moved by the same amount: no spread to estimate an error from", None
    lost, gained = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    return agresti_min_stderr(lost, gained, len(diffs)), None, (lost, gained)


def paired_drop_stderr(
    base: Mapping[Any, float], comp: Mapping[Any, float], base_value: float, comp_value: float, metric: str, source: str = "the samples files"
) -> tuple[float | None, str | None]:
    """(standard error of mean(base) - mean(comp) over the documents both scored, None) when the pairing holds,
    else (None, why, naming ``source``): the same documents, at least two, and each reported score the mean of
    its documents'.

    When every document moved the same way (most often: no answer changed), the sample spread is zero and would
    claim certainty. For 0/1 scores the error is then Agresti and Min's (:func:`agresti_min_stderr`): half a
    document added to each cell of the 2x2 table of (base, comp) answers, so that n unchanged documents still leave
    about 1/(n+2). Other scores have no standard error then."""
    stderr, why, _ = _paired_noise(base, comp, base_value, comp_value, metric, source)
    return stderr, why


def zero_stderr_floor(score: float, documents: float) -> float:
    """The standard error of a 0/1 mean ``score`` over ``documents`` whose sample spread is zero (lm-eval writes a
    stderr of 0 for a score of 0 or 1): that of (x+1)/(n+2), x = score * n right answers, half a document added to
    each side as the paired Agresti-Min error does."""
    p = (score * documents + 1) / (documents + 2)
    return math.sqrt(p * (1 - p) / (documents + 2))


def _evaluated_documents(results: ResultsFile, task: str, score: float) -> int | None:
    """The documents a 0/1 mean ``score`` was taken over (n-samples' effective), or None when the results do not
    say or the score is no count of right answers over them."""
    counts = sample_counts(results, task)
    if counts is None or not 0.0 <= score <= 1.0:
        return None
    correct = score * counts[0]
    return counts[0] if abs(correct - round(correct)) <= 1e-6 * counts[0] else None


def _drop_noise(
    task: str, metric_key: str, baseline: ResultsFile, compressed: ResultsFile, base_value: float, comp_value: float, relative: bool
) -> tuple[DropNoise | None, str | None, bool]:
    """:func:`drop_noise`, plus whether a missing error means "no bound can be given" (zero stderrs that would claim
    certainty) rather than "gate on the drop alone"."""
    if relative and base_value == 0:
        return None, "a relative drop from a zero baseline has no standard error", False
    scale = abs(base_value) if relative else 1.0
    note = None
    b = per_document_scores(baseline, task, metric_key)
    c = per_document_scores(compressed, task, metric_key)
    if b is not None and c is not None:
        stderr, why, agresti = _paired_noise(b, c, base_value, comp_value, metric_key, "the samples files")
        if stderr is None and b.keys() == c.keys():  # a perplexity of the mean (lambada's): each document counts 1
            stderr, _ = paired_corpus_stderr({k: (v, 1.0) for k, v in b.items()}, {k: (v, 1.0) for k, v in c.items()}, base_value, comp_value, metric_key)
        if stderr is not None:  # the sign of the drop does not change its standard error
            error_at: Callable[[int], float] | None = None
            if agresti is not None:
                n, (lost, gained) = len(b), agresti

                def agresti_at(m: int) -> float:  # as many answers lost and gained per document, over m documents
                    return agresti_min_stderr(lost * m / n, gained * m / n, m) / scale

                error_at = agresti_at
            return DropNoise(stderr / scale, "paired", len(b), error_at), None, False
        note = f"{why}: unpaired standard error"
    elif (pb := per_document_parts(baseline, task, metric_key)) is not None and (pc := per_document_parts(compressed, task, metric_key)) is not None:
        stderr, why = paired_corpus_stderr(pb, pc, base_value, comp_value, metric_key)
        if stderr is not None:
            return DropNoise(stderr / scale, "paired", len(pb)), None, False
        note = f"{why}: unpaired standard error"
    elif all(samples_path(f, task) is not None for f in (baseline, compressed)):
        note = f"the samples files do not give one number per document for {metric_key}: unpaired standard error"
    name, flt = metric_key.split(",", 1)
    errors = [metric_number((f.entry(task) or {}).get(f"{name}_stderr,{flt}")) for f in (baseline, compressed)]
    if any(e is None or not math.isfinite(e) for e in errors):  # lm-eval writes NaN where a stderr failed
        why = f"no standard error for {metric_key} in the results (nor samples from both runs): gated on the drop alone"
        return None, why if note is None else f"{note.removesuffix(': unpaired standard error')}; {why}", False
    if all(e == 0 for e in errors):
        # lm-eval writes a stderr of 0 for a score of 0 or 1; taken as is, the bounds would collapse onto the drop.
        documents = [_evaluated_documents(f, task, v) for f, v in ((baseline, base_value), (compressed, comp_value))]
        if any(n is None for n in documents):
            why = f"lm-eval's stderr of {metric_key} is 0 in both runs, which would claim certainty, and the results do not give each score as a 0/1 mean over a known number of documents (n-samples): no bound"
            return None, why if note is None else f"{note}; {why}", True
        floor_note = f"lm-eval's stderr of {metric_key} is 0 in both runs (a score of 0 or 1): each taken as that of (x+1)/(n+2) over its documents"
        note = floor_note if note is None else f"{note}; {floor_note}"
        stderr = math.hypot(*(zero_stderr_floor(v, n) for v, n in zip((base_value, comp_value), documents))) / scale  # type: ignore[arg-type]

        def floor_at(m: int) -> float:  # the same scores over m documents in each run
            return math.hypot(zero_stderr_floor(base_value, m), zero_stderr_floor(comp_value, m)) / scale

        return DropNoise(stderr, "unpaired", None, floor_at), note, False
    return DropNoise(math.hypot(*errors) / scale, "unpaired"), note, False


def drop_noise(
    task: str, metric_key: str, baseline: ResultsFile, compressed: ResultsFile, base_value: float, comp_value: float, relative: bool = False
) -> tuple[DropNoise | None, str | None]:
    """(the standard error of the drop from ``base_value`` to ``comp_value``, a note): paired over documents when
    both runs logged their samples and the metric is a mean over documents, else from lm-eval's stderr of each
    score (as independent), else None. Two stderrs of 0 (lm-eval's for a score of 0 or 1) would claim certainty:
    each is then that of (x+1)/(n+2) over the run's n documents, or, where n is unknown, there is no error (None)."""
    noise, note, _ = _drop_noise(task, metric_key, baseline, compressed, base_value, comp_value, relative)
    return noise, note


def parse_confidence(value: float | None) -> float | None:
    if value is not None and not 0.5 <= value < 1:
        raise GateError(f"--confidence {value:g} is invalid: give a level in [0.5, 1), e.g. 0.95")
    return value


def sample_counts(results: ResultsFile, task: str, _seen: frozenset[str] = frozenset()) -> tuple[int, int] | None:
    """(documents evaluated, documents the task has), from the results' ``n-samples``; a group sums its
    subtasks'. None where the results do not say."""
    counts = results.data.get("n-samples")
    entry = counts.get(task) if isinstance(counts, Mapping) else None
    if isinstance(entry, Mapping):
        effective, original = entry.get("effective"), entry.get("original")
        ok = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (effective, original))
        return (effective, original) if ok else None  # type: ignore[return-value]
    children = results.group_subtasks.get(task)
    if not children or task in _seen:
        return None
    total = (0, 0)
    for child in children:
        got = sample_counts(results, child, _seen | {task})
        if got is None:
            return None
        total = (total[0] + got[0], total[1] + got[1])
    return total


def documents_to_decide(
    drop: float, stderr: float, documents: int, max_drop: float, z: float, error_at: Callable[[int], float] | None = None
) -> int | None:
    """How many documents would move the bound past the tolerance, were the drop and the spread per document to
    hold: the standard error shrinks as 1/sqrt(n). With ``error_at`` (the error at m documents, for the zero-spread
    errors that shrink about as 1/m) it is the smallest m at which the gate's own verdict is decided. None when the
    drop sits on the tolerance."""
    gap = abs(max_drop - drop)
    if gap <= _EPS or not stderr > 0 or not math.isfinite(stderr):
        return None
    if error_at is None:
        return math.ceil(documents * (z * stderr / gap) ** 2)

    def decides(m: int) -> bool:  # the same comparisons as _apply_confidence's verdict
        bound = z * error_at(m)
        return drop + bound <= max_drop + _EPS if drop < max_drop else drop - bound > max_drop + _EPS

    # The zero-spread errors fall monotonically in m (none changed: 1/(m+2); all lost: sqrt(3m+2)/(m+2)^1.5), so
    # bracket the answer by doubling, then bisect.
    low = high = max(documents, 1)
    while not decides(high):
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if decides(middle) else (middle, high)
    return high


def _apply_confidence(
    row: Row, noise: DropNoise | None, note: str | None, z: float, counts: tuple[int, int] | None = None, unbounded: bool = False
) -> None:
    """PASS when the upper bound of the drop is within the tolerance, FAIL when the lower bound exceeds it. An
    UNSURE row says how many documents would decide it, where the documents evaluated are known. ``unbounded``:
    there is no error because the one there was would claim certainty, so a drop within the tolerance cannot PASS
    (one beyond it still FAILs, as on the drop alone)."""
    row.noise = noise
    if note:
        row.note = note if row.note is None else f"{row.note}; {note}"
    if noise is None and unbounded and row.verdict == "PASS":
        row.verdict = "UNSURE"
    if noise is None or row.drop is None or not math.isfinite(row.drop):
        return
    lo, hi = row.drop - z * noise.stderr, row.drop + z * noise.stderr
    row.interval = (lo, hi)
    row.verdict = "PASS" if hi <= row.max_drop + _EPS else "FAIL" if lo > row.max_drop + _EPS else "UNSURE"
    documents = noise.documents or (counts[0] if counts else None)
    if row.verdict != "UNSURE" or documents is None:
        return
    row.task_documents = counts[1] if counts else None
    row.documents_to_decide = documents_to_decide(row.drop, noise.stderr, documents, row.max_drop, z, noise.error_at)
    if row.documents_to_decide is None:
        advice = "the drop sits on the tolerance: no number of documents decides it"
    else:
        would = "PASS" if row.drop < row.max_drop else "FAIL"
        advice = f"about {row.documents_to_decide} would make it {would}, if the drop and its spread per document hold"
        if row.task_documents is not None:
            advice += f" (more than the {row.task_documents} the task has)" if row.documents_to_decide > row.task_documents else f" (the task has {row.task_documents})"
    unsure = f"UNSURE at {documents} documents: {advice}"
    row.note = unsure if row.note is None else f"{row.note}; {unsure}"


# --------------------------------------------------------------------------- gate


@dataclass
class Row:
    """One gated task."""

    task: str
    metric: str | None
    baseline: float | None
    compressed: float | None
    drop: float | None
    max_drop: float
    higher_is_better: bool
    verdict: str  # PASS, FAIL, MISSING, or UNSURE (with a confidence level: the bounds straddle the tolerance)
    alias: str | None = None
    note: str | None = None
    noise: DropNoise | None = None  # with a confidence level: the drop's standard error
    interval: tuple[float, float] | None = None  # the one-sided lower and upper confidence bounds of the drop
    documents_to_decide: int | None = None  # UNSURE: the documents at which the bound would clear the tolerance
    task_documents: int | None = None  # UNSURE: the documents the task has (n-samples' original)


@dataclass
class GateResult:
    """Outcome of one gate run."""

    rows: list[Row]
    baseline: ResultsFile
    compressed: ResultsFile
    max_drop: float | None
    relative: bool
    warnings: list[str] = field(default_factory=list)
    confidence: float | None = None
    unsure_passes: bool = False
    row_confidence: float | None = None  # each bound's own level (below ``confidence`` when family-wise)
    min_reduction: float | None = None  # the compressed run must cut at least this fraction of the parameters
    reduction: float | None = None  # the fraction it cut (config.lowrank.decomposition.param_reduction)
    allow_incomparable: bool = False  # gate runs with other few-shot counts or documents anyway

    @property
    def comparable_passed(self) -> bool:
        return not self.warnings or self.allow_incomparable

    @property
    def reduction_passed(self) -> bool:
        return self.min_reduction is None or (self.reduction is not None and self.reduction >= self.min_reduction - _EPS)

    @property
    def passed(self) -> bool:
        rows = all(r.verdict == "PASS" or (r.verdict == "UNSURE" and self.unsure_passes) for r in self.rows)
        return rows and self.reduction_passed and self.comparable_passed

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.passed else EXIT_FAIL


def metric_drop(base: float, comp: float, higher_is_better: bool, relative: bool) -> float:
    """How much worse ``comp`` is than ``base`` (positive: worse), absolute or relative to ``base``."""
    diff = base - comp if higher_is_better else comp - base
    if not relative:
        return diff
    if base == 0:
        return 0.0 if diff <= 0 else math.inf
    return diff / abs(base)


def _gate_one(
    task: str,
    baseline: ResultsFile,
    compressed: ResultsFile,
    requested_metric: str | None,
    explicit: bool,
    tolerance: float,
    relative: bool,
) -> Row:
    b_entry, c_entry = baseline.entry(task), compressed.entry(task)
    alias = (b_entry or c_entry or {}).get("alias")

    def missing(note: str, metric: str | None = None) -> Row:
        return Row(task, metric, None, None, None, tolerance, True, "MISSING", alias, note)

    if b_entry is None:
        where = "either file" if c_entry is None else "the baseline"
        return missing(f"not in {where}")
    if explicit:
        metric_key = choose_metric(b_entry, requested_metric)
    else:
        # A global --metric applies where the task reports it; other tasks keep the default rule.
        metric_key = (requested_metric and choose_metric(b_entry, requested_metric)) or choose_metric(b_entry)
    if metric_key is None:
        what = f"no metric {requested_metric!r}" if explicit else "no metric values"
        return missing(f"{what} in the baseline", requested_metric if explicit else None)
    metric_name = metric_key.split(",", 1)[0]
    hib = is_higher_better(task, metric_name, (baseline, compressed))
    base = metric_number(b_entry.get(metric_key))
    if c_entry is None:
        row = missing("not in the compressed results", metric_key)
        row.baseline, row.higher_is_better = base, hib
        return row
    if metric_key not in c_entry:
        row = missing(f"{metric_key} not in the compressed results", metric_key)
        row.baseline, row.higher_is_better = base, hib
        return row
    comp = metric_number(c_entry.get(metric_key))
    if base is None or comp is None:  # lm-eval writes numbers: the file is malformed (an input error, not a drop)
        bad, entry = (baseline, b_entry) if base is None else (compressed, c_entry)
        raise GateError(f"{bad.path}: {task}'s {metric_key} is {entry.get(metric_key)!r}, not a number; the file is malformed")
    drop = metric_drop(base, comp, hib, relative)
    if not math.isfinite(drop):
        # NaN compares False with everything, so without this a NaN score would pass.
        why = "non-finite score" if math.isnan(drop) or not relative or base != 0 else "any drop from a baseline of 0 is an infinite relative drop: gate this task with an absolute tolerance"
        return Row(task, metric_key, base, comp, drop, tolerance, hib, "FAIL", alias, why)
    verdict = "FAIL" if drop > tolerance + _EPS else "PASS"
    return Row(task, metric_key, base, comp, drop, tolerance, hib, verdict, alias)


def _matches(key: str, requested: str) -> bool:
    return key == requested if "," in requested else key.split(",", 1)[0] == requested


def _comparability_warnings(tasks: Sequence[str], baseline: ResultsFile, compressed: ResultsFile) -> list[str]:
    """Settings that make the two runs incomparable: the gate fails on them unless told to allow them."""
    out = []
    b_shots, c_shots = baseline.data.get("n-shot"), compressed.data.get("n-shot")
    for task in tasks:
        if isinstance(b_shots, Mapping) and isinstance(c_shots, Mapping):
            b, c = b_shots.get(task), c_shots.get(task)
            if b is not None and c is not None and b != c:
                out.append(f"{task}: num_fewshot differs (baseline {b}, compressed {c}); the runs are not comparable")
        # lm-eval writes n-samples for leaf tasks only: sample_counts sums a group's subtasks, so a group run at
        # another --limit is caught too.
        b_counts, c_counts = sample_counts(baseline, task), sample_counts(compressed, task)
        if b_counts is not None and c_counts is not None and b_counts[0] != c_counts[0]:
            out.append(f"{task}: evaluated samples differs (baseline {b_counts[0]}, compressed {c_counts[0]}); the runs are not comparable")
    return out


def _spread_over_subtasks(baseline: ResultsFile, per_task: dict[str, Any], selected: Sequence[str]) -> None:
    """A per-task option named for a group that aggregates nothing (so is gated as its subtasks) applies to each of
    its gated subtasks, below any option named for the subtask or a nearer group."""
    groups = [g for g in per_task if g not in selected and _children(baseline, g) and not _has_metrics(baseline, g)]
    below = {g: [t for t in _expand(baseline, g, True, set()) if t in selected and t != g] for g in groups}
    explicit = set(per_task) - set(groups)
    for group in sorted(groups, key=lambda g: -len(below[g])):  # the widest first: nearer groups overwrite it
        if below[group]:
            value = per_task.pop(group)
            per_task.update({t: value for t in below[group] if t not in explicit})


def run_gate(
    baseline: ResultsFile,
    compressed: ResultsFile,
    *,
    max_drop: float | None,
    task_max_drop: Mapping[str, float] | None = None,
    tasks: Sequence[str] = (),
    metric: str | None = None,
    task_metric: Mapping[str, str] | None = None,
    relative: bool = False,
    subtasks: bool = False,
    confidence: float | None = None,
    unsure_passes: bool = False,
    family_wise: bool = False,
    min_reduction: float | None = None,
    allow_incomparable: bool = False,
) -> GateResult:
    """Gate every selected task; raise :class:`GateError` for options that cannot apply.

    With ``confidence`` (e.g. 0.95) each drop is gated on its one-sided confidence bounds: PASS when the upper
    bound is within the tolerance, FAIL when the lower bound exceeds it, UNSURE in between (a failure unless
    ``unsure_passes``). See :func:`drop_noise` for the standard error. With ``family_wise`` the level holds for
    all the bounds together (Bonferroni), so gating many subtasks does not multiply the chance of a wrong FAIL.
    With ``min_reduction`` the compressed run must also have cut at least that fraction of the model's parameters
    (its ``config.lowrank`` block), so that a change that leaves the model dense cannot pass. Runs that are not
    comparable (another num_fewshot, another number of documents) fail unless ``allow_incomparable``.
    """
    confidence = parse_confidence(confidence)
    if min_reduction is not None and not 0.0 <= min_reduction < 1.0:
        raise GateError(f"--min-reduction {min_reduction:g} is invalid: give the fraction of parameters the compressed run must cut, 0 <= x < 1 (e.g. 0.05)")
    if unsure_passes and confidence is None:
        raise GateError("--unsure pass needs --confidence: without it no verdict is UNSURE")
    if family_wise and confidence is None:
        raise GateError("--family-wise needs --confidence: it spreads that level over the gated tasks")
    task_max_drop = dict(task_max_drop or {})
    task_metric = dict(task_metric or {})
    if baseline.path.resolve() == compressed.path.resolve():
        raise GateError(
            f"{baseline.path}: baseline and compressed resolve to the same file; "
            "write the dense and compressed runs to separate --output_path folders"
        )
    selected = select_tasks(baseline, tasks, subtasks)
    if not selected:
        raise GateError(f"{baseline.path}: no tasks to gate")
    for option, per_task in (("--metric", task_metric), ("--max-drop", task_max_drop)):
        _spread_over_subtasks(baseline, per_task, selected)
        stray = sorted(set(per_task) - set(selected))
        if stray:
            raise GateError(f"{option} names tasks that are not gated: {', '.join(stray)}")
    # A name in neither file, or a metric the baseline's task does not report, is a typo, not a regression: exit 2,
    # so that CI tells them apart from a task that really went missing from the compressed run (exit 1).
    unknown = [t for t in selected if baseline.entry(t) is None and compressed.entry(t) is None]
    if unknown:
        offered = ", ".join(baseline.data.get("results", {})) or "none"
        raise GateError(f"--tasks: {', '.join(map(repr, unknown))} in neither results file; the baseline has {offered}")
    for task, wanted in task_metric.items():
        entry = baseline.entry(task)
        if entry is not None and choose_metric(entry, wanted) is None:
            have = ", ".join(dict.fromkeys(m for _, m, _ in _metrics(entry))) or "none"
            raise GateError(f"--metric {task}={wanted}: the baseline's {task} reports no {wanted!r}; it has {have}")
    rows = []
    for task in selected:
        tolerance = task_max_drop.get(task, max_drop)
        if tolerance is None:
            raise GateError(f"no --max-drop for {task}; give a default --max-drop NUMBER or {task}=NUMBER")
        explicit = task in task_metric
        rows.append(
            _gate_one(task, baseline, compressed, task_metric.get(task, metric), explicit, tolerance, relative)
        )
    if metric is not None and not any(r.metric and _matches(r.metric, metric) for r in rows):
        # Almost always a typo (acc-norm); silently falling back would gate the wrong thing.
        raise GateError(f"--metric {metric}: no gated task reports this metric")
    per_row = None
    if confidence is not None:
        scored = [r for r in rows if r.verdict != "MISSING" and r.metric is not None and r.drop is not None and math.isfinite(r.drop)]
        noises = [_drop_noise(r.task, r.metric, baseline, compressed, r.baseline, r.compressed, relative) for r in scored]  # type: ignore[arg-type]
        # Bonferroni: with k bounds at 1 - (1 - C) / k each, all k hold together with probability >= C.
        k = sum(noise is not None for noise, _, _ in noises)
        per_row = 1 - (1 - confidence) / k if family_wise and k > 1 else confidence
        z = statistics.NormalDist().inv_cdf(per_row)
        for row, (noise, note, unbounded) in zip(scored, noises):
            _apply_confidence(row, noise, note, z, sample_counts(baseline, row.task), unbounded)
    gated = [r.task for r in rows if r.verdict != "MISSING"]
    warnings = _comparability_warnings(gated, baseline, compressed)
    return GateResult(rows, baseline, compressed, max_drop, relative, warnings, confidence, unsure_passes, per_row, min_reduction, parameter_reduction(compressed), allow_incomparable)


def parameter_reduction(results: ResultsFile) -> float | None:
    """The fraction of parameters an hf-tucker run cut (``config.lowrank.decomposition.param_reduction``); 0.0 for
    an hf-tucker run that decomposed nothing, None for a run that is not hf-tucker's."""
    lowrank = (results.data.get("config") or {}).get("lowrank")
    if not isinstance(lowrank, Mapping):
        return None
    decomposition = lowrank.get("decomposition") or {}
    return metric_number(decomposition.get("param_reduction")) or 0.0


# --------------------------------------------------------------------------- output


def _fmt_value(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _fmt_drop(value: float | None, relative: bool) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    return f"{value * 100:+.2f}%" if relative else f"{value:+.4f}"


def _fmt_tol(value: float, relative: bool) -> str:
    return f"{value * 100:g}%" if relative else f"{value:g}"


def _describe(label: str, f: ResultsFile) -> str:
    line = f"{label} {f.path}"
    if f.note:
        line += f"  ({f.note})"
    return line


def format_table(result: GateResult) -> str:
    """Human-readable report: files used, the table, notes and the overall verdict."""
    rel = result.relative
    tolerances = {r.max_drop for r in result.rows}
    per_task_tol = len(tolerances) > 1 or (result.max_drop is not None and tolerances != {result.max_drop})
    bounds = f"{result.row_confidence:.4g} bounds" if result.row_confidence is not None else None
    header = ["task", "metric", "baseline", "compressed", "drop"] + (["max"] if per_task_tol else [])
    header += [bounds, "stderr from"] if bounds else []
    header.append("verdict")
    body = []
    for r in result.rows:
        metric = "-" if r.metric is None else r.metric + ("" if r.higher_is_better else " (lower better)")
        cells = [r.task, metric, _fmt_value(r.baseline), _fmt_value(r.compressed), _fmt_drop(r.drop, rel)]
        if per_task_tol:
            cells.append(_fmt_tol(r.max_drop, rel))
        if bounds:
            cells.append("-" if r.interval is None else f"{_fmt_drop(r.interval[0], rel)} .. {_fmt_drop(r.interval[1], rel)}")
            cells.append("-" if r.noise is None else f"{r.noise.documents} paired docs" if r.noise.kind == "paired" else "lm-eval stderr")
        cells.append(r.verdict)
        body.append(cells)
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    numeric = {"baseline", "compressed", "drop", "max", bounds}

    def line(cells: list[str]) -> str:
        parts = [c.rjust(w) if h in numeric else c.ljust(w) for c, w, h in zip(cells, widths, header)]
        return "  ".join(parts).rstrip()

    kind = "relative" if rel else "absolute"
    tol = "per task" if result.max_drop is None else _fmt_tol(result.max_drop, rel)
    out = [
        _describe("baseline:  ", result.baseline),
        _describe("compressed:", result.compressed),
        f"max drop:   {tol} ({kind}; for lower-is-better metrics the drop is the increase)",
    ]
    if result.confidence is not None:
        unsure = "passes" if result.unsure_passes else "fails"
        family = f", family-wise: {result.row_confidence:.4g} per bound" if result.row_confidence != result.confidence else ""
        out.append(
            f"confidence: {result.confidence:g}{family}, one-sided: PASS when the upper bound is within the tolerance, FAIL when the lower bound exceeds it, UNSURE between ({unsure})"
        )
    out += [
        "",
        line(header),
        line(["-" * w for w in widths]),
        *(line(cells) for cells in body),
        "",
    ]
    out += [f"note: {r.task}: {r.note}" for r in result.rows if r.note]
    out += [f"warning: {w}" for w in result.warnings]
    if result.min_reduction is not None:
        cut = "not an hf-tucker run (no config.lowrank block)" if result.reduction is None else f"{100 * result.reduction:.2f} % of the parameters"
        out.append(f"reduction: {cut}, at least {100 * result.min_reduction:g} % asked: {'PASS' if result.reduction_passed else 'FAIL'}")
    failed = sum(r.verdict == "FAIL" for r in result.rows)
    missing = sum(r.verdict == "MISSING" for r in result.rows)
    unsure = sum(r.verdict == "UNSURE" for r in result.rows)
    unsure_text = f", {unsure} unsure" if unsure else ""
    reduction_text = "" if result.reduction_passed else ", parameter reduction below the minimum"
    if not result.comparable_passed:
        reduction_text += ", runs not comparable: see the warnings; --allow-incomparable gates them anyway"
    if result.passed:
        out.append(f"gate: PASS ({len(result.rows)} task{'s' if len(result.rows) != 1 else ''} within tolerance{unsure_text})")
    else:
        out.append(f"gate: FAIL ({failed} failed{unsure_text}, {missing} missing, of {len(result.rows)} gated{reduction_text})")
    return "\n".join(out)


def _json_number(value: float | None) -> float | None:
    # Strict JSON has no NaN/Infinity; the verdict and note already say what happened.
    return value if value is None or math.isfinite(value) else None


def to_json(result: GateResult) -> dict[str, Any]:
    """Machine-readable verdict (``--json``)."""

    def describe(f: ResultsFile) -> dict[str, Any]:
        return {"path": str(f.path), "requested": str(f.requested), "note": f.note, "model": f.model_name}

    return {
        "passed": result.passed,
        "exit_code": result.exit_code,
        "max_drop": result.max_drop,
        "relative": result.relative,
        "confidence": result.confidence,
        "row_confidence": result.row_confidence,
        "unsure_passes": result.unsure_passes,
        "min_reduction": result.min_reduction,
        "param_reduction": result.reduction,
        "reduction_passed": result.reduction_passed,
        "comparable": not result.warnings,
        "allow_incomparable": result.allow_incomparable,
        "baseline": describe(result.baseline),
        "compressed": describe(result.compressed),
        "tasks": [
            {
                "task": r.task,
                "alias": r.alias,
                "metric": r.metric,
                "higher_is_better": r.higher_is_better,
                "baseline": _json_number(r.baseline),
                "compressed": _json_number(r.compressed),
                "drop": _json_number(r.drop),
                "max_drop": r.max_drop,
                "verdict": r.verdict,
                "note": r.note,
                "stderr": None if r.noise is None else _json_number(r.noise.stderr),
                "stderr_kind": None if r.noise is None else r.noise.kind,
                "paired_documents": None if r.noise is None else r.noise.documents,
                "bounds": None if r.interval is None else [_json_number(v) for v in r.interval],
                "documents_to_decide": r.documents_to_decide,
                "task_documents": r.task_documents,
            }
            for r in result.rows
        ],
        "warnings": list(result.warnings),
    }
