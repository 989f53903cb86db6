"""Calibration data and sequential, layer-at-a-time activation statistics.

Data (``calib=``): local text only, read directly from the benchmark data folder.
One source or several joined by ``+`` (mixed evenly), e.g. ``calib=arc_easy_local+gsm8k_local``.

The no-leak rule: calibration reads a split that the evaluated tasks do not score.

- ``wikitext_local``: the data has only the test documents, all 62 of which the task
  ``wikitext_local`` scores. Calibration uses a fixed held-out portion, documents 50..61
  (``WIKITEXT_CALIB_DOCS``); benchmarks in this repository score documents 0..49 only.
  Because the lm-eval task scores all 62, ``calib=wikitext_local`` is refused when
  ``wikitext_local`` (or built-in ``wikitext``) is evaluated.
- task sources read their non-evaluated split where one exists (ARC: validation, the
  tasks score test; GSM8K: train; MMLU: dev). BoolQ, TruthfulQA, LAMBADA and HellaSwag
  have only their scored split, so they are refused as calibration when that task is
  evaluated.

The check compares files: a leak is any calibration file that an evaluated task scores.
The evaluated tasks are given explicitly (``eval_tasks=``), or taken from
``$LM_EVAL_LOWRANK_EVAL_TASKS`` or lm_eval's ``--tasks`` on the command line; when none
can be found the check is recorded as ``unchecked`` in the JSON.

Statistics: :class:`SequentialStatsProvider` keeps the hidden states of the calibration
batches at the input of one decoder layer. Asked for layer L, it first runs the layers
between (as they are now: already compressed) and then layer L once with hooks that
accumulate X^T X of each target's input, each layer with its own call arguments (layers
of another type get another attention mask and RoPE: Gemma-2/3, sliding windows). Peak
memory is the model plus those hidden states; nothing runs the whole model: the first
pass runs the embeddings and the first layer, the later layers stubbed out, to record
every layer's arguments.
With ``calib_target`` above 0 it also keeps the dense model's hidden states (a second
stream, forked at the first compressed layer) and accumulates X^T X_ref against the
dense model's inputs of the same linear (error correction). With ``calib_staged=true``
decompose_model asks for one layer in stages, each after the earlier ones were replaced.
Statistics are cached on disk per (model, data, layer, everything decomposed before it).
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import hashlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .half_backward import linears_in_fp32, slow_half_products_on
from .measure import free_memory_bytes
from .methods import LayerStats, with_output_fisher
from .modules import expert_projection, expert_projection_names, routed_pairs
from .spec import (
    FACTOR_FIELDS,
    GRADIENT_ALLOCATORS,
    GRADIENT_METHODS,
    GRADIENT_ONLY_METHODS,
    DecompositionSpec,
    SpecError,
    parse_calib_target,
)

FISHER_VERSION = "2"  # bump when fisher_row_sums changes meaning (2: keyed by the tokens, every weight fingerprinted)
# bump when the statistics computed here change meaning (3: the inputs' mean |x| too; 4: stored in fp64, each layer
# with its own call arguments, every weight fingerprinted)
STATS_VERSION = "4"
_CALIB_DATA_FIELDS = ("calib", "calib_n", "calib_len", "calib_batch")  # keyed by the data itself (record, batch)
EVAL_TASKS_ENV = "LM_EVAL_LOWRANK_EVAL_TASKS"
WIKITEXT_CALIB_DOCS = range(50, 62)  # held-out wikitext documents used for calibration
WIKITEXT_EVAL_DOCS = range(0, 50)  # the ones benchmarks here may score


# -- data folder ------------------------------------------------------------------------


def data_root() -> Path:
    """The benchmark data folder (``tasks.data_dir``: ``$LM_EVAL_LOWRANK_DATA`` or ../shared/data)."""
    from .tasks import DataDirError, data_dir

    try:
        return data_dir()
    except DataDirError as exc:
        raise SpecError(f"calib: {exc}") from None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


# -- sources -----------------------------------------------------------------------------


def _arc(d: dict[str, Any]) -> str:
    ch = d["choices"]
    ans = ch["text"][ch["label"].index(d["answerKey"])] if d.get("answerKey") in ch["label"] else ""
    return f"Question: {d['question']}\nAnswer: {ans}"


def _mmlu(d: dict[str, Any]) -> str:
    letters = "ABCD"
    opts = "\n".join(f"{letters[i]}. {c}" for i, c in enumerate(d["choices"]))
    return f"{d['question'].strip()}\n{opts}\nAnswer: {letters[int(d['answer'])]}"


def _truthfulqa(d: dict[str, Any]) -> str:
    t = d["mc1_targets"]
    return f"Q: {d['question']}\nA: {t['choices'][t['labels'].index(1)]}"


@dataclass(frozen=True)
class CalibSource:
    name: str
    split: str  # human-readable split description recorded in the JSON
    files: tuple[str, ...]  # relative to the data folder (globs allowed)
    fmt: Any  # doc -> text
    docs: range | None = None  # a fixed subset of the documents (wikitext's held-out part)

    def resolve(self, root: Path) -> list[Path]:
        out: list[Path] = []
        for rel in self.files:
            hits = sorted(root.glob(rel)) if any(c in rel for c in "*?[") else [root / rel]
            out += hits
        missing = [p for p in out if not p.is_file()]
        if not out or missing:
            raise SpecError(f"calib={self.name!r} is invalid: data file {missing[0] if missing else self.files[0]} is missing; set LM_EVAL_LOWRANK_DATA")
        return out

    def texts(self, root: Path) -> list[str]:
        docs: list[dict[str, Any]] = []
        for path in self.resolve(root):
            docs += _read_jsonl(path)
        if self.docs is not None:
            docs = [docs[i] for i in self.docs if i < len(docs)]
        return [self.fmt(d) for d in docs]


SOURCES: dict[str, CalibSource] = {
    s.name: s
    for s in (
        CalibSource("wikitext_local", f"test documents {WIKITEXT_CALIB_DOCS.start}..{WIKITEXT_CALIB_DOCS.stop - 1} (held out)", ("wikitext/test.jsonl",), lambda d: d["page"], WIKITEXT_CALIB_DOCS),
        CalibSource("arc_easy_local", "validation", ("arc_easy/validation.jsonl",), _arc),
        CalibSource("arc_challenge_local", "validation", ("arc_challenge/validation.jsonl",), _arc),
        CalibSource("gsm8k_local", "train", ("gsm8k/train.jsonl",), lambda d: f"Question: {d['question']}\nAnswer: {d['answer']}"),
        CalibSource("mmlu_local", "dev", ("mmlu/dev/*.jsonl",), _mmlu),
        CalibSource("boolq_local", "validation (its scored split)", ("boolq/validation.jsonl",), lambda d: f"{d['passage']}\nQuestion: {d['question']}?\nAnswer: {'yes' if d['label'] else 'no'}"),
        CalibSource("truthfulqa_local", "validation (its scored split)", ("truthfulqa/validation.jsonl",), _truthfulqa),
        CalibSource("lambada_openai_local", "test (its scored split)", ("lambada_openai/test.jsonl",), lambda d: d["text"]),
        CalibSource("hellaswag_approx_local", "validation (its scored split)", ("hellaswag_llamacpp/validation-*.jsonl",), lambda d: f"{d['query']} {d['choices'][int(d['label'])]}"),
    )
}


def parse_calib(value: str) -> list[CalibSource]:
    """``a+b+c`` -> sources, each once; one-line SpecError naming the valid ones."""
    names = [p.strip() for p in str(value).split("+")]
    if not names or any(not n for n in names):
        raise SpecError(f"calib={value!r} is invalid: expected source names joined by '+'; valid: {', '.join(SOURCES)}")
    bad = [n for n in names if n not in SOURCES]
    if bad:
        raise SpecError(f"calib={value!r} is invalid: unknown source {bad[0]!r}; valid: {', '.join(SOURCES)}")
    if len(set(names)) != len(names):
        raise SpecError(f"calib={value!r} is invalid: a source is given twice")
    return [SOURCES[n] for n in names]


# -- the no-leak rule --------------------------------------------------------------------


def _lm_eval_arguments(argv: Sequence[str]) -> list[str] | None:
    """The arguments of an lm-eval command line (``lm_eval``, ``lm-eval``, ``python -m lm_eval``); None for any
    other program (``lm-eval-lowrank`` included: its own options are not lm-eval's)."""
    if not argv:
        return None
    prog = Path(argv[0])
    name = prog.name.lower().removesuffix(".exe")
    if name in ("lm_eval", "lm-eval") or (name == "__main__.py" and prog.parent.name == "lm_eval"):  # -m sets argv[0] to the file
        return list(argv[1:])
    if len(argv) >= 3 and argv[1] == "-m" and argv[2] in ("lm_eval", "lm_eval.__main__"):
        return list(argv[3:])
    return None


def evaluated_tasks_from_env(argv: Sequence[str] | None = None) -> list[str] | None:
    """Evaluated task names from $LM_EVAL_LOWRANK_EVAL_TASKS or lm_eval's ``--tasks`` argument."""
    env = os.environ.get(EVAL_TASKS_ENV)
    if env:
        return [t.strip() for t in env.split(",") if t.strip()]
    args = _lm_eval_arguments(list(sys.argv if argv is None else argv))
    if args is None:
        return None
    # Parsed as lm-eval parses it: nargs="+", repeated flags add up, abbreviations (--task) and -tX are accepted.
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=True, exit_on_error=False)
    parser.add_argument("--tasks", "-t", nargs="+", action="extend", default=None)
    parser.add_argument("--config", "-C", default=None)
    try:
        parsed = parser.parse_known_args(args)[0]
    except (argparse.ArgumentError, SystemExit):  # e.g. --tasks with no value: lm-eval refuses the line itself
        return None
    found = parsed.tasks
    if found is None and parsed.config:  # `lm_eval run --config F.yaml`: the command line overrides the file
        found = _config_file_tasks(parsed.config)
    if found is None:
        return None
    return [t.strip() for v in found for t in v.split(",") if t.strip()]


def _config_file_tasks(path: str) -> list[str] | None:
    """The ``tasks`` of an lm-eval ``--config`` YAML (a name, a comma list or a list); None where unreadable."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):  # lm-eval refuses the file itself
        return None
    tasks = data.get("tasks") if isinstance(data, dict) else None
    if isinstance(tasks, str):
        return [tasks]
    if isinstance(tasks, list) and all(isinstance(t, str) for t in tasks):
        return list(tasks)
    return None


# lm-eval tags and groups over the built-ins that the local data stands in for (as in lm-eval 0.4.13): known without
# lm-eval's task index, which takes seconds to build. Other names are looked up there.
_BUILTIN_GROUPS: dict[str, tuple[str, ...]] = {
    "ai2_arc": ("arc_easy", "arc_challenge"),
    "lambada": ("lambada_openai", "lambada_standard"),
    "truthfulqa": ("truthfulqa_mc1", "truthfulqa_mc2", "truthfulqa_gen"),
    "super-glue-lm-eval-v1": ("boolq", "cb", "copa", "multirc", "record", "sglue_rte", "wic", "wsc"),
    "lambada_multilingual": tuple(f"lambada_openai_mt_{lang}" for lang in ("de", "en", "es", "fr", "it")),
}
# Other lm-eval 0.4.13 built-ins that score the same documents as one the local data stands in for (the same
# dataset and split, another prompt or config of it).
_SAME_DOCUMENTS: dict[str, str] = {
    "truthfulqa_gen": "truthfulqa_mc1",  # truthful_qa's generation config: the same 817 validation questions
    "lambada_openai_mt_en": "lambada_openai",  # EleutherAI/lambada_openai, en: the default config's passages
    "lambada_openai_cloze_yaml": "lambada_openai",
    **{f"gsm8k_{variant}": "gsm8k" for variant in ("cot", "cot_zeroshot", "cot_self_consistency", "cot_llama")},
}
_GLOB_CHARS = frozenset("*?[")


def _group_entries(members: Any) -> list[str]:
    """Member names of a group's ``task:`` list (names, or inline configs naming a task or a group)."""
    out: list[str] = []
    for m in members if isinstance(members, list) else [members]:
        if isinstance(m, str):
            out.append(m)
        elif isinstance(m, dict):
            inner = m.get("task")
            if isinstance(inner, list):  # an inline group: its own members
                out += _group_entries(inner)
            elif isinstance(inner, str):
                out.append(inner)
            elif isinstance(m.get("group"), str):
                out.append(m["group"])
    return out


def task_groups_of(manager: Any) -> dict[str, tuple[str, ...]]:
    """{tag or group: the names it lists} from an lm-eval ``TaskManager``'s index."""
    out: dict[str, tuple[str, ...]] = {}
    for name, entry in manager.task_index.items():
        if isinstance(entry, Mapping):  # lm-eval before 0.4.11: plain dicts, tags listing their tasks
            kind, tagged, cfg = str(entry.get("type", "")), entry.get("task"), None
        else:
            kind, tagged, cfg = getattr(getattr(entry, "kind", None), "name", ""), getattr(entry, "tags", None), getattr(entry, "cfg", None)
        kind = kind.lower()
        if kind == "tag" and tagged:
            out[name] = tuple(sorted(tagged)) if isinstance(tagged, (set, frozenset)) else tuple(_group_entries(tagged))
        elif kind == "group" and isinstance(cfg, Mapping) and cfg.get("task"):
            out[name] = tuple(_group_entries(cfg["task"]))
    return out


def _task_groups_cache() -> Path | None:
    """Where _lm_eval_task_groups keeps its result: keyed by lm-eval's version and its task folders (their mtimes)."""
    from importlib.metadata import version

    from .assets import cache_root
    from .tasks import lm_eval_tasks_dir

    try:
        folder = lm_eval_tasks_dir()
        stamp = [(d.name, d.stat().st_mtime_ns) for d in [folder, *sorted(folder.iterdir())] if d.is_dir()]
        return cache_root() / "lm_eval_task_groups" / f"{_sha({'v': version('lm_eval'), 'dir': str(folder), 'stamp': stamp})}.json"
    except Exception:  # no lm-eval, or no writable cache: build in memory only
        return None


@functools.lru_cache(maxsize=1)
def _lm_eval_task_groups() -> dict[str, tuple[str, ...]]:
    """lm-eval's tags and groups (task_groups_of) from its own YAML (offline), {} without it. Building lm-eval's index
    takes 15-40 s, so it is built once per process and kept on disk for the next."""
    cache = _task_groups_cache()
    if cache is not None and cache.is_file():
        try:
            return {k: tuple(v) for k, v in json.loads(cache.read_text()).items()}
        except (OSError, ValueError, AttributeError, TypeError):  # torn or foreign: rebuilt
            pass
    try:
        from lm_eval.tasks import TaskManager

        groups = task_groups_of(TaskManager())
    except Exception:  # no lm-eval, or another layout of its index: only the built-in map is known
        return {}
    if cache is not None and groups:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(groups, sort_keys=True))
            os.replace(tmp, cache)
        except OSError:  # a read-only cache never breaks a run
            pass
    return groups


def _group_members(name: str) -> set[str] | None:
    """The tasks an lm-eval tag or group name runs (through nested groups); None when it is neither."""
    if name in _BUILTIN_GROUPS:
        return set(_BUILTIN_GROUPS[name])
    groups = _lm_eval_task_groups()
    if name not in groups:
        return None
    leaves: set[str] = set()
    todo, seen = [name], set()
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            members = groups.get(n) or _BUILTIN_GROUPS.get(n)
            if members:
                todo += members
            else:
                leaves.add(n)
    return leaves


def _scored_files(task: str) -> set[str] | None:
    """Files (relative to the data folder) that an evaluated task (or an lm-eval tag or group) scores; None if
    unknown."""
    from .tasks import local_tasks

    known = local_tasks()
    files = _task_scored_files(task, known)
    if files is not None:
        return files
    members = _group_members(task)  # only for names not known directly: the index takes seconds
    if not members:
        return None
    found = [f for f in (_task_scored_files(m, known) for m in sorted(members)) if f is not None]
    return set().union(*found) if found else None


def _task_scored_files(task: str, known: Iterable[Any]) -> set[str] | None:
    """_scored_files of a task name (a local task, its group, or the built-in it stands in for) among ``known``
    (tasks.local_tasks())."""
    task = _SAME_DOCUMENTS.get(task, task)
    files: set[str] = set()
    matched = False
    for t in known:
        builtin = t.builtin.split()[0]
        if task in (t.name, t.group, builtin) or (task == "mmlu" and t.group == "mmlu_local") or (
            task.startswith("mmlu_local_") and t.name.startswith("mmlu_local_") and task.removeprefix("mmlu_local_") in ("stem", "other", "social_sciences", "humanities")
        ):
            files.update(t.files)
            matched = True
    return files if matched else None


def tasks_scoring(path: str | os.PathLike) -> list[str]:
    """Local tasks that score ``path`` (a file in the benchmark data folder); [] when none or unknown."""
    from .tasks import DataDirError, data_dir, local_tasks

    try:
        rel = Path(path).resolve().relative_to(data_dir().resolve()).as_posix()
    except (ValueError, DataDirError):  # outside the data folder, or no data folder: nothing known scores it
        return []
    return sorted(t.name for t in local_tasks() if rel in t.files)


def check_no_leak(calib: str | Iterable[CalibSource], eval_tasks: Iterable[str] | None, root: Path | None = None) -> dict[str, Any]:
    """Refuse calibration data that an evaluated task scores; return the record for the JSON.

    Raises :class:`SpecError` naming the source, the file and the task on overlap.
    ``eval_tasks=None`` (unknown) records ``status: unchecked``.
    """
    sources = parse_calib(calib) if isinstance(calib, str) else list(calib)
    root = root or data_root()
    calib_files: dict[str, str] = {}
    for s in sources:
        for p in s.resolve(root):
            calib_files[p.relative_to(root).as_posix()] = s.name
    if eval_tasks is None:
        return {"status": "unchecked", "reason": "evaluated tasks unknown", "calib_files": sorted(calib_files)}

    def refuse(task: str, file: str) -> SpecError:
        other = [n for n, s in SOURCES.items() if "scored" not in s.split and n != "wikitext_local"]
        return SpecError(
            f"calib={calib_files[file]!r} is invalid while evaluating {task!r}: it reads {file}, which {task} scores "
            f"(calibration must not see evaluated data); use e.g. calib={'+'.join(other[:2])}"
        )

    tasks = list(eval_tasks)
    unknown = _refuse_overlap(calib_files, tasks, refuse)
    return {**_leak_status(unknown), "evaluated_tasks": tasks, "unrecognised_tasks": unknown, "calib_files": sorted(calib_files)}


def _refuse_overlap(read: Mapping[str, str], tasks: list[str], refuse: Any) -> list[str]:
    """Raise ``refuse(task, file)`` for the first file in ``read`` that an evaluated task scores;
    return the tasks whose scored files are unknown. A pattern (lm-eval expands ``wikitext*`` with fnmatch) is
    checked through every name it matches here, and stays unknown: it may match tasks this check does not know."""
    unknown: list[str] = []
    for task in tasks:
        matched = _known_matches(task) if _GLOB_CHARS & set(task) else [task]
        if matched != [task]:
            unknown.append(task)
        for name in matched:
            scored = _scored_files(name)
            if scored is None:
                if name == task:
                    unknown.append(task)
                continue
            overlap = sorted(set(read) & scored)
            if overlap:
                raise refuse(task if name == task else f"{name} (from {task})", overlap[0])
    return unknown


def _known_matches(pattern: str) -> list[str]:
    """The task, group and tag names this check knows (local tasks, the built-ins they stand in for, lm-eval's
    groups and tags) that ``pattern`` matches as lm-eval matches it (fnmatch)."""
    import fnmatch

    from .tasks import local_tasks

    names = {n for t in local_tasks() for n in (t.name, t.group, t.builtin.split()[0]) if n}
    names |= set(_SAME_DOCUMENTS) | set(_BUILTIN_GROUPS) | {m for ms in _BUILTIN_GROUPS.values() for m in ms}
    groups = _lm_eval_task_groups()
    names |= set(groups) | {m for ms in groups.values() for m in ms}
    return sorted(fnmatch.filter(names, pattern))


def _leak_status(unknown: list[str]) -> dict[str, str]:
    """``ok`` only when every evaluated task is known to the check: a task it does not know may score the very
    documents calibration read (another config of the same dataset), so the record says so instead."""
    if not unknown:
        return {"status": "ok"}
    return {"status": "unchecked", "reason": f"what {', '.join(unknown)} score{'s' if len(unknown) == 1 else ''} is not known to the no-leak check"}


def _in_data_folder(path: Path, root: Path) -> str | None:
    """``path`` relative to the data folder: inside it, or else by its trailing components (``<task folder>/<file>``,
    as in another copy of the data or on another machine) naming a file or folder there; None when neither."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        pass
    parts = path.parts
    for k in range(1, len(parts)):  # the shortest suffix that names something in the data folder
        rel = Path(*parts[-k:])
        if (root / rel).is_dir() or (k >= 2 and (root / rel).is_file()):  # a bare file name says too little
            return rel.as_posix()
    return None


def _data_relative_files(path: str, root: Path) -> tuple[list[str], list[str]]:
    """(files of the data folder that ``path`` names, the paths that map to none of them). ``path`` is a file or a
    folder, absolute or data-relative; one recorded elsewhere (another copy of the data, another machine) is mapped
    by its trailing components (_in_data_folder)."""
    p = Path(path).expanduser()
    p = p if p.is_absolute() else root / p
    if p.exists():  # this machine's files: each one mapped
        files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
        rels = [(str(f), _in_data_folder(f, root)) for f in files]
    else:  # recorded elsewhere: what it names in this data folder
        rel = _in_data_folder(p, root)
        target = root / rel if rel is not None else None
        if target is not None and target.is_dir():
            rels = [(str(f), f.relative_to(root).as_posix()) for f in sorted(target.iterdir()) if f.is_file()]
        else:
            rels = [(str(p), rel if target is not None and target.is_file() else None)]
    mapped = [r for _f, r in rels if r is not None and (root / r).is_file()]
    return mapped, [f for f, r in rels if r is None or not (root / r).is_file()]


def check_checkpoint_no_leak(manifest: Mapping[str, Any], eval_tasks: Iterable[str] | None, where: str = "the checkpoint") -> dict[str, Any]:
    """The no-leak rule for a saved compressed checkpoint, against the tasks evaluated now.

    The rule was checked when the checkpoint was made against the tasks of *that* run (often
    none: ``lm-eval-lowrank decompose`` evaluates nothing). Here every file its calibration and
    its healing read is checked against what is evaluated now. Raises :class:`SpecError` naming
    the file and the task on overlap; returns the record for the JSON. Healing data recorded in
    another copy of the data folder (or on another machine) is matched by its trailing path
    (``<task folder>/<file>``); data that names no file of this data folder is ``unchecked``.
    """
    calib = (manifest.get("decomposition") or {}).get("calibration") or {}
    healing_data = [rec.get("data") for rec in manifest.get("healing") or []]
    if not calib and not any(healing_data):
        return {"status": "ok", "reason": "the checkpoint read no data (no calibration, no healing)", "files": []}
    try:
        root = data_root()
    except SpecError as exc:
        return {"status": "unchecked", "reason": str(exc)}
    read: dict[str, str] = {}  # data-relative file -> what read it
    unmapped: list[str] = []  # read, but not a file of this data folder by any name: what it is is unknown
    calib_files = (calib.get("leak_check") or {}).get("calib_files")
    if calib and not calib_files:  # a record without its files (an older checkpoint): what it read is unknown
        unmapped.append(f"calibration (calib={calib.get('source')}), whose files the checkpoint does not record")
    for f in calib_files or []:
        read[f] = f"calibration (calib={calib.get('source')})"
    for i, data in enumerate(healing_data):
        for path in [data] if isinstance(data, str) else list(data or []):
            mapped, elsewhere = _data_relative_files(str(path), root)
            for f in mapped:
                read.setdefault(f, f"healing step {i + 1}")
            unmapped += [f"{u} (healing step {i + 1})" for u in elsewhere]
    if eval_tasks is None:
        return {"status": "unchecked", "reason": "evaluated tasks unknown", "files": sorted(read), **({"unmapped": unmapped} if unmapped else {})}
    tasks = list(eval_tasks)
    unknown = _refuse_overlap(
        read,
        tasks,
        lambda task, file: SpecError(
            f"pretrained={where}: its {read[file]} read {file}, which {task} scores (a model must not "
            f"have seen evaluated data); evaluate other tasks, or rebuild the checkpoint from other data"
        ),
    )
    out = {**_leak_status(unknown), "evaluated_tasks": tasks, "unrecognised_tasks": unknown, "files": sorted(read)}
    if unmapped:  # never "ok" for data that could not be matched to this data folder's files
        out.update(
            status="unchecked",
            reason=f"{unmapped[0]}: not matched to a file of the data folder {root}; whether an evaluated task scores it is unknown",
            unmapped=unmapped,
        )
    return out


# -- token sampling ----------------------------------------------------------------------


def _windows(tokenizer: Any, texts: list[str], n: int, length: int, seed: int, name: str, asked: tuple[int, str] | None = None) -> torch.Tensor:
    """``n`` non-overlapping windows of ``length`` tokens from the shuffled, joined texts. ``asked``: the user's
    (calib_n, calib) when this source takes a share of several, for the error."""
    rng = random.Random(seed)
    order = list(range(len(texts)))
    if name != "wikitext_local":  # keep wikitext articles whole and in order
        rng.shuffle(order)
    need = n * length
    ids: list[int] = []
    sep = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    budget_chars = 0
    chunk: list[str] = []
    for i in order:  # tokenise only as much text as is needed (gsm8k train is large)
        chunk.append(texts[i])
        budget_chars += len(texts[i])
        if budget_chars > 3 * need + 4096 or i == order[-1]:
            for t in chunk:
                ids += tokenizer(t, add_special_tokens=False)["input_ids"] + sep
            chunk, budget_chars = [], 0
            if len(ids) >= 2 * need:
                break
    for t in chunk:
        ids += tokenizer(t, add_special_tokens=False)["input_ids"] + sep
    total = len(ids) // length
    if total == 0:  # not one window: calib_len is what is wrong, whatever calib_n is
        raise SpecError(
            f"calib_len={length} is invalid for calib={name!r}: the source holds {len(ids)} tokens, not one window; "
            f"use calib_len<={len(ids)}, or add sources with '+'"
        )
    if total < n:
        calib_n, calib = asked if asked is not None else (n, name)
        share = f"{name}, its {n} of the {calib_n} windows, holds" if asked is not None else "the source holds"
        raise SpecError(
            f"calib_n={calib_n} is invalid for calib={calib!r} at calib_len={length}: {share} only {total} windows "
            f"({len(ids)} tokens); lower calib_n or calib_len, or add sources with '+'"
        )
    picks = sorted(rng.sample(range(total), n))
    return torch.tensor([ids[p * length : (p + 1) * length] for p in picks], dtype=torch.long)


def _tokens_key(spec: DecompositionSpec, tokenizer: Any, root: Path) -> tuple[Any, ...] | None:
    """What the windows depend on; None for a tokenizer without a name (never reused)."""
    name = getattr(tokenizer, "name_or_path", None)
    if not name:
        return None
    return (type(tokenizer).__name__, str(name), len(tokenizer), spec.calib, spec.calib_n, spec.calib_len, spec.seed, str(root))


# The windows the check before the weights load sampled (check_calibration_windows), taken by the calibration that
# follows it (once), so they are tokenised once.
_CHECKED_TOKENS: dict[tuple[Any, ...], tuple[torch.Tensor, dict[str, Any]]] = {}


def calibration_tokens(spec: DecompositionSpec, tokenizer: Any, root: Path | None = None) -> tuple[torch.Tensor, dict[str, Any]]:
    """(input_ids n x len, record) for ``spec.calib``; sources mixed evenly and interleaved."""
    root = root or data_root()
    key = _tokens_key(spec, tokenizer, root)
    if key is not None and key in _CHECKED_TOKENS:
        return _CHECKED_TOKENS.pop(key)
    return _sample_calibration_tokens(spec, tokenizer, root)


def check_calibration_windows(spec: DecompositionSpec, tokenizer: Any) -> None:
    """Refuse a ``calib_n`` / ``calib_len`` the sources cannot fill, from the tokenizer alone, so before the weights
    load (it was found only after a 7B load). The windows are kept for the calibration that follows."""
    if not spec.reads_calibration or tokenizer is None:
        return
    root = data_root()
    found = _sample_calibration_tokens(spec, tokenizer, root)
    _CHECKED_TOKENS.clear()
    if (key := _tokens_key(spec, tokenizer, root)) is not None:
        _CHECKED_TOKENS[key] = found


def _sample_calibration_tokens(spec: DecompositionSpec, tokenizer: Any, root: Path) -> tuple[torch.Tensor, dict[str, Any]]:
    sources = parse_calib(spec.calib if spec.calib is not None else "wikitext_local")  # calib='' is refused there
    n, length = spec.calib_n, spec.calib_len
    per = [n // len(sources) + (1 if i < n % len(sources) else 0) for i in range(len(sources))]
    parts: list[torch.Tensor] = []
    for s, k in zip(sources, per):
        if k:
            asked = (n, "+".join(x.name for x in sources)) if len(sources) > 1 else None
            parts.append(_windows(tokenizer, s.texts(root), k, length, spec.seed, s.name, asked))
    # Interleave so that every batch mixes the sources.
    rows: list[torch.Tensor] = []
    for i in range(max(p.shape[0] for p in parts)):
        rows += [p[i] for p in parts if i < p.shape[0]]
    ids = torch.stack(rows)
    record = {
        "source": "+".join(s.name for s in sources),
        "split": {s.name: s.split for s in sources},
        "n": n,
        "len": length,
        "tokens": int(ids.numel()),
        "per_source": {s.name: k for s, k in zip(sources, per)},
        "seed": spec.seed,
    }
    return ids, record


# -- statistics --------------------------------------------------------------------------


def _lookup(root: nn.Module, path: str) -> Any:
    """The module or parameter at ``path`` (a stacked expert projection is either), or None if absent."""
    parent, _, leaf = path.rpartition(".")
    try:
        owner = root.get_submodule(parent) if parent else root
    except AttributeError:
        return None
    found = getattr(owner, leaf, None)
    return found if isinstance(found, (nn.Module, nn.Parameter)) else None


def _put(root: nn.Module, path: str, value: Any) -> Any:
    """Set the module or parameter at ``path`` (either may replace the other); return what was there."""
    parent, _, leaf = path.rpartition(".")
    owner = root.get_submodule(parent) if parent else root
    old = getattr(owner, leaf)
    if isinstance(value, nn.Module):
        owner._parameters.pop(leaf, None)  # setattr refuses a module where a parameter is registered
    setattr(owner, leaf, value)
    return old


def _experts_inputs(args: tuple, kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden_states, top_k_index, top_k_weights) of a call of an experts module, however they were passed."""
    names = ("hidden_states", "top_k_index", "top_k_weights")
    values = list(args[:3]) + [kwargs.get(n) for n in names[len(args[:3]) :]]
    return values[0], values[1], values[2]


def expert_inputs(
    module: nn.Module, hidden: torch.Tensor, index: torch.Tensor, paths: Sequence[str], up_weight: Any = None
) -> Iterator[tuple[str, int, torch.Tensor, torch.Tensor]]:
    """(path, expert, its token count, the input that expert's projection at ``path`` sees) for every expert the
    router sent tokens to: the routed hidden states for the up projection, the gated intermediate for down_proj
    (through ``up_weight`` in place of the module's own up projection when given). In expert order, so two calls
    with one ``index`` pair up."""
    x = hidden.detach().reshape(-1, hidden.shape[-1])
    up_name, down_name = expert_projection_names(module)
    for e, pairs in routed_pairs(index, module.num_experts):
        xe = x[pairs // index.shape[-1]]
        for p in paths:
            if p.endswith(f".{down_name}"):
                h = expert_projection(module, up_name, xe, e, weight=up_weight)
                yield p, e, len(pairs), module._apply_gate(h) if module.has_gate else module.act_fn(h)
            else:
                yield p, e, len(pairs), xe


class _Stop(Exception):
    pass


def _first_tensor(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_fingerprint(model: nn.Module, model_id: str | None = None) -> str:
    """A cheap identity of the weights: id, config and a strided sample of every parameter."""
    cfg = model.config.to_json_string() if hasattr(model.config, "to_json_string") else str(model.config)
    h = hashlib.sha256((str(model_id or getattr(model.config, "_name_or_path", "")) + cfg).encode())
    for name, p in model.named_parameters():  # every tensor (a fine-tune may change any one), every 997th value
        h.update(name.encode())
        h.update(p.detach().flatten()[::997].float().cpu().numpy().tobytes())
    if (adapters := peft_adapter_digest(model)) is not None:  # the stride above may skip every value of a small adapter
        h.update(adapters.encode())
    return h.hexdigest()[:16]


def _accumulate(sums: dict[str, torch.Tensor], key: str, product: torch.Tensor) -> None:
    """Add an fp32 product into an fp64 running sum on the CPU, in place: no fp64 temporaries (two
    18.9 MB ones per batch at a 1536-wide input), and the same bits as converting first."""
    product = product.cpu()
    if key in sums:
        sums[key].add_(product)
    else:
        sums[key] = product.to(torch.float64)


def peft_adapter_digest(model: nn.Module) -> str | None:
    """The digest of every weight of the peft adapters wrapped around the model's linears (modules with a
    ``base_layer``), None without any. Calibration activations pass through them, so data-aware statistics and
    factors follow them, while the base weights and their files stay the same. Adapters are small: every value."""
    h, found = hashlib.sha256(), False
    for name, mod in model.named_modules():
        if not hasattr(mod, "base_layer"):
            continue
        for pname, p in mod.named_parameters():
            if pname.startswith("base_layer."):
                continue
            found = True
            h.update(f"{name}.{pname}\0{str(p.dtype)}\0{tuple(p.shape)}\0".encode())
            h.update(p.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest() if found else None


def tokens_digest(input_ids: torch.Tensor) -> str:
    """The digest of calibration tokens: it covers the data folder, its files, the tokenizer and the sampling seed,
    which the statistics and factors computed from them follow (the caches key on it)."""
    ids = input_ids.detach().to("cpu", torch.int64).contiguous()
    return hashlib.sha256(str(tuple(ids.shape)).encode() + ids.numpy().tobytes()).hexdigest()


def capture_layer_inputs(model: nn.Module, layers: Any, input_ids: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, dict[str, Any], torch.Tensor]]:
    """(hidden states at the first decoder layer's input, that layer's call kwargs, the token ids) per batch.

    Only the embedding pass runs: a pre-hook on the first layer records its inputs and stops the forward. The kwargs
    are the first layer's: right for another layer only where all take the same (not Gemma-2/3 or sliding-window
    layers, whose mask and RoPE go by layer type); capture_layer_calls records each layer's.
    """
    device = next(model.parameters()).device
    out: list[tuple[torch.Tensor, dict[str, Any], torch.Tensor]] = []
    grabbed: dict[str, Any] = {}

    def grab(_mod: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        grabbed["h"] = args[0] if args else kwargs.pop("hidden_states")
        grabbed["kw"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Stop

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for i in range(0, input_ids.shape[0], batch_size):
            batch = input_ids[i : i + batch_size].to(device)
            try:
                model(input_ids=batch, use_cache=False)
            except _Stop:
                pass
            out.append((grabbed["h"].detach(), grabbed["kw"], batch))
    finally:
        handle.remove()
    return out


def _output_like(first: Any, hidden: torch.Tensor) -> Any:
    """``hidden`` in the form of the first layer's output ``first`` (a tensor, or a tuple led by one)."""
    if isinstance(first, tuple):
        return (hidden, *first[1:])
    if isinstance(first, list):
        return [hidden, *first[1:]]
    return hidden


class _SharedArguments:
    """Stores the call kwargs of every layer and batch once per distinct value: a tensor equal to one already held
    (the mask and RoPE of each layer type, the same for every batch of one shape) is replaced by that one, and a
    layer whose kwargs are all the same objects as an earlier layer's shares that layer's dict."""

    def __init__(self) -> None:
        self._tensors: list[torch.Tensor] = []
        self._dicts: list[dict[str, Any]] = []

    def _value(self, v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            for t in self._tensors:
                if t is v or (t.shape == v.shape and t.dtype == v.dtype and t.device == v.device and torch.equal(t, v)):
                    return t
            self._tensors.append(v)
            return v
        if isinstance(v, tuple) and v and all(isinstance(x, torch.Tensor) for x in v):  # (cos, sin)
            return tuple(self._value(x) for x in v)
        return v

    def add(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        kw = {k: self._value(v) for k, v in kwargs.items()}

        def same(a: Any, b: Any) -> bool:
            return a is b or (isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b) and all(x is y for x, y in zip(a, b)))

        for d in self._dicts:
            if d.keys() == kw.keys() and all(same(d[k], kw[k]) for k in kw):
                return d
        self._dicts.append(kw)
        return kw


def capture_layer_calls(model: nn.Module, layers: Any, input_ids: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, list[dict[str, Any]], torch.Tensor]]:
    """(hidden states at the first decoder layer's input, every layer's call kwargs, the token ids) per batch.

    Layers of different types get different kwargs (Gemma-2/3, sliding-window Qwen2: their own attention mask and
    RoPE), so each layer's are recorded, in one pass per batch: the first layer runs, every later one is a stub that
    returns its input in the first layer's output form (no compute), and the last layer's pre-hook stops the forward
    (no logits). Equal kwargs are held once (_SharedArguments). A layer the forward never reached gets the first's.
    """
    device = next(model.parameters()).device
    count = len(layers)
    out: list[tuple[torch.Tensor, list[dict[str, Any]], torch.Tensor]] = []
    calls: dict[int, dict[str, Any]] = {}
    grabbed: dict[str, Any] = {}
    shared = _SharedArguments()

    def make_grab(i: int):
        def grab(_mod: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            if i in calls:  # one module listed twice: its first call
                return
            if i == 0:
                grabbed["h"] = args[0] if args else kwargs["hidden_states"]
            calls[i] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            if i == count - 1:
                raise _Stop  # every layer's kwargs are in: the final norm and the head are not needed

        return grab

    def keep_output(_mod: nn.Module, _args: tuple, output: Any) -> None:
        grabbed["out"] = output

    def stub(*args: Any, **kwargs: Any) -> Any:
        return _output_like(grabbed["out"], args[0] if args else kwargs["hidden_states"])

    def stop(*_: Any) -> None:
        raise _Stop

    handles = [layer.register_forward_pre_hook(make_grab(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles.append(layers[0].register_forward_hook(keep_output))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(head, nn.Module) and head is not embed:  # a layer the forward never calls (the last one): still no logits
        handles.append(head.register_forward_pre_hook(stop))
    stubbed: dict[int, tuple[nn.Module, Any]] = {}  # id -> (layer, its instance's own forward or None), put back at the end
    try:
        for layer in list(layers)[1:]:
            if layer is not layers[0] and id(layer) not in stubbed:
                stubbed[id(layer)] = (layer, layer.__dict__.get("forward"))
                layer.forward = stub
        for i in range(0, input_ids.shape[0], batch_size):
            batch = input_ids[i : i + batch_size].to(device)
            calls.clear()
            try:
                model(input_ids=batch, use_cache=False)
            except _Stop:
                pass
            kwargs = [shared.add(calls.get(j, calls[0])) for j in range(count)]
            out.append((grabbed["h"].detach(), kwargs, batch))
            grabbed.pop("out", None)
    finally:
        for hd in handles:
            hd.remove()
        for layer, own in stubbed.values():
            if own is None:
                del layer.forward
            else:
                layer.forward = own
    return out


class SequentialStatsProvider:
    """Input statistics of one decoder layer (or one stage of it) at a time, on the model as it is now.

    ``target`` > 0 (error correction: 1 or ``"dense"``) also keeps the dense model's hidden
    states: each request then returns, besides C = X^T X / N of the inputs X of the model as
    it is, ``cross_cov`` = C + target * (P - C) with P = X^T X_ref / N and X_ref the same
    linear's inputs in the dense model; with target=1 that fits the dense outputs, with a
    smaller weight a blend of both (a shrinkage: the full fit overfits the calibration). The dense
    stream forks from the compressed one at the first compressed layer; the provider holds
    the dense modules of the layer being decomposed (references, no copies) and runs them
    on that stream. Requests for one layer may come several times (staged calibration:
    q,k,v -> o -> gate,up -> down), each after the previous stages were replaced.
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: Any,
        input_ids: torch.Tensor,
        batch_size: int = 8,
        record: dict[str, Any] | None = None,
        cache_dir: Path | None = None,
        model_key: str | None = None,
        spec: DecompositionSpec | None = None,
        track_sparsity: float | None = None,
        target: float | str = 0.0,
        shard: Any = None,
        fisher: FisherStatsProvider | None = None,
    ) -> None:
        self.adapter = adapter
        # the rows' Fisher sums, attached to every request's statistics (fwhiten); computed at the first request,
        # before any module is replaced
        self.fisher = fisher
        # data-parallel processes (decompose.ProcessShard) that split the calibration batches and add up the sums
        self.shard = shard
        self.input_ids = input_ids
        self.batch_size = batch_size
        self.record = dict(record or {})
        self.cache_dir = cache_dir
        self.model_key = model_key
        self.spec = spec
        self.track_sparsity = track_sparsity  # eps: also count |x| < eps * max|x| per input
        self.target = parse_calib_target(target)  # weight of the dense model's outputs
        self.sparsity: dict[str, float] = {}
        self.allocation: dict[str, Any] | None = None
        self._hidden: list[torch.Tensor] | None = None
        self._kwargs: list[list[dict[str, Any]]] = []  # per batch, per layer: the layer's call kwargs
        self._at = 0  # 0-based index of the layer whose input self._hidden holds
        self._ref: list[torch.Tensor] | None = None  # dense hidden states, once they differ from _hidden
        self._ref_at = 0
        self._dense: dict[int, dict[str, nn.Module]] = {}  # layer index0 -> {module path: its dense module}
        self._last = -1  # index0 of the previous request
        self._pages: Any = None  # a decompose._PageReleaser, made on first use
        self.hits = 0
        self.misses = 0
        self.seconds = 0.0
        self.layers_computed: list[int] = []
        self.stage_order = "adapter"  # where the stages within a layer came from (forward: read off its forward)
        # kind of layer (its tensors) -> {tensor: stage}, read off a forward (forward_stages)
        self._stage_maps: dict[tuple[str, ...], dict[str, int]] = {}

    # -- hidden-state bookkeeping --------------------------------------------------------
    def _sharing(self) -> bool:
        """Whether the processes split the batches (each needs one at least)."""
        return self.shard is not None and math.ceil(len(self.input_ids) / self.batch_size) >= self.shard.world

    def _batch_starts(self, rank: int) -> range:
        """The first rows of the batches process ``rank`` runs: whole batches, round robin."""
        return range(rank * self.batch_size, len(self.input_ids), self.shard.world * self.batch_size)

    def unshare(self) -> None:
        """Calibrate on every batch in this process alone from now on (the others stopped calibrating)."""
        self.shard = None
        if self.fisher is not None:
            self.fisher.unshare()
        self.release()

    def _capture(self, model: nn.Module) -> None:
        layers = self.adapter.layers(model)
        ids = self.input_ids
        if self._sharing():  # the batches a single process runs, split
            ids = torch.cat([ids[s : s + self.batch_size] for s in self._batch_starts(self.shard.rank)])
        captured = capture_layer_calls(model, layers, ids, self.batch_size)
        self._hidden = [h for h, _kw, _ids in captured]
        self._kwargs = [kw for _h, kw, _ids in captured]
        self._at = 0

    def _reset(self) -> None:
        self._hidden, self._kwargs, self._ref, self._dense = None, [], None, {}
        self._at = self._ref_at = 0

    def _run_layer(self, layers: Any, index0: int, hidden: list[torch.Tensor]) -> None:
        for b, (h, kw) in enumerate(zip(hidden, self._kwargs)):
            hidden[b] = _first_tensor(layers[index0](h, **kw[index0])).detach()

    def _advance(self, model: nn.Module, index0: int) -> None:
        if self._hidden is None or index0 < self._at:
            self._capture(model)
        layers = self.adapter.layers(model)
        while self._at < index0:
            self._run_layer(layers, self._at, self._hidden)
            self._at += 1

    # -- the dense reference stream ------------------------------------------------------
    def _remember_dense(self, model: nn.Module, index0: int, targets: list[Any]) -> None:
        """Hold this layer's target modules while they are still dense (replaced ones are kept alive)."""
        from .modules import LowRankExpertWeights, LowRankLinear

        held = self._dense.setdefault(index0, {})
        for t in targets:
            path, mod = t.path, _lookup(model, t.path)  # a module, or a stacked expert parameter
            if hasattr(mod, "base_layer"):  # decompose_model replaces a peft adapter's base layer
                path, mod = f"{path}.base_layer", mod.base_layer
            if not isinstance(mod, (LowRankLinear, LowRankExpertWeights)):
                held.setdefault(path, mod)

    @contextmanager
    def _as_dense(self, model: nn.Module, index0: int) -> Iterator[None]:
        """Put the held dense modules (and stacked expert parameters) of a layer back for the duration of the block."""
        swapped: list[tuple[str, Any]] = []
        try:
            for path, dense in self._dense.get(index0, {}).items():
                if _lookup(model, path) is not dense:
                    swapped.append((path, _put(model, path, dense)))
            yield
        finally:
            for path, now in reversed(swapped):
                _put(model, path, now)

    def _drop_dense(self, model: nn.Module, index0: int) -> None:
        """Forget a layer's dense modules; return the file-mapped pages the reference runs touched again."""
        from .decompose import _PageReleaser

        held = self._dense.pop(index0, {})
        gone = [m for p, m in held.items() if _lookup(model, p) is not m and hasattr(m, "weight")]
        if not gone:
            return
        if self._pages is None:
            self._pages = _PageReleaser()
        if self._pages.libc is not None:
            live = {p.untyped_storage().data_ptr() for p in model.parameters() if p.device.type == "cpu"}
            for m in gone:
                self._pages.release(m.weight, live)

    def _advance_ref(self, model: nn.Module, index0: int) -> None:
        """Bring the dense stream to layer ``index0``'s input, running held layers dense."""
        if self._ref is None:
            # Nothing before the compressed stream's position was compressed yet: fork there.
            if self._hidden is None:
                self._capture(model)
            self._ref, self._ref_at = list(self._hidden or []), self._at
        layers = self.adapter.layers(model)
        while self._ref_at < index0:
            with self._as_dense(model, self._ref_at):
                self._run_layer(layers, self._ref_at, self._ref)
            self._drop_dense(model, self._ref_at)
            self._ref_at += 1

    # -- cache -------------------------------------------------------------------------
    def _prefix(self, model: nn.Module, index0: int) -> list[Any]:
        """What was decomposed before these inputs (earlier layers, earlier stages): the stats depend on it."""
        from .modules import LowRankExpertWeights, LowRankLinear

        layers = self.adapter.layers(model)
        out: list[Any] = []
        for i in range(index0 + 1):
            for name, mod in layers[i].named_modules():
                if isinstance(mod, (LowRankLinear, LowRankExpertWeights)):
                    out.append([i, name, mod.rank, mod.layout])
        return out

    def _cache_path(self, model: nn.Module, index0: int, prefix: list[Any], reference: bool) -> Path | None:
        if self.cache_dir is None or self.model_key is None:
            return None
        key: dict[str, Any] = {"v": STATS_VERSION, "prefix": prefix, "dtype": str(next(model.parameters()).dtype)}
        if prefix and self.spec is not None:  # how the earlier layers were decomposed: every option that moves their factors
            spec_d = self.spec.to_dict()
            key.update({k: spec_d.get(k) for k in FACTOR_FIELDS if k not in _CALIB_DATA_FIELDS}, target=self.target)
        if reference:
            key["reference"] = "dense"
        data = {k: self.record.get(k) for k in ("source", "n", "len", "seed")}
        data["batch"] = self.batch_size
        data["tokens"] = tokens_digest(self.input_ids)  # another data folder, file or tokenizer: other statistics
        return self.cache_dir / self.model_key / _sha(data) / f"L{index0 + 1:03d}-{_sha(key)}.pt"

    # -- stages of architectures whose adapter lists none ---------------------------------
    def forward_stages(self, model: nn.Module, layer: int, targets: list[Any]) -> list[list[Any]]:
        """``targets`` of one layer grouped by the input tensor they share, in the order a layer's forward reaches
        them (e.g. query_key_value; dense; dense_h_to_4h; dense_4h_to_h for GPT-NeoX). The order is read off the
        layer itself, still dense when this is asked, once per kind of layer (the set of linears it holds: hybrid
        and MoE models mix kinds). Unreached tensors come last."""
        block = self.adapter.layers(model)[layer - 1]
        present = tuple(t for t in self.adapter.tensor_names() if _lookup(block, self.adapter.tensor_paths[t]) is not None)
        stage_map = self._stage_maps.get(present)
        if stage_map is None:
            stage_map = self._stage_maps[present] = self._read_stage_map(model, block, present, layer - 1)
        last = max(stage_map.values(), default=-1) + 1
        groups: dict[int, list[Any]] = {}
        for t in targets:
            groups.setdefault(stage_map.get(t.tensor, last), []).append(t)
        self.stage_order = "forward"
        return [groups[i] for i in sorted(groups)]

    @torch.no_grad()
    def _read_stage_map(self, model: nn.Module, first: nn.Module, tensors: tuple[str, ...], index0: int) -> dict[str, int]:
        if self._hidden is None:
            self._capture(model)  # the first layer's inputs, and every layer's call kwargs
        # Any hidden state of the stream will do (only which input each linear sees matters), and the
        # layer's output is dropped: the stream is left as it was.
        inputs: list[torch.Tensor] = []  # held, so that no later input can reuse a freed one's memory
        stage_of: dict[str, int] = {}

        def make_hook(tensor: str):
            def hook(_mod: nn.Module, args: tuple) -> None:
                if tensor in stage_of or not args:
                    return
                i = next((k for k, y in enumerate(inputs) if y is args[0]), None)
                if i is None:
                    inputs.append(args[0])
                    i = len(inputs) - 1
                stage_of[tensor] = i
                if len(stage_of) == len(tensors):
                    raise _Stop

            return hook

        def make_experts_hook(owned: list[str]):
            # The routed tokens enter with the module's input; its down projection's input exists only inside it.
            def hook(mod: nn.Module, args: tuple) -> None:
                if not args:
                    return
                i = next((k for k, y in enumerate(inputs) if y is args[0]), None)
                if i is None:
                    inputs.append(args[0])
                    i = len(inputs) - 1
                inner = len(inputs)
                inputs.append(torch.empty(0))
                down = f".{expert_projection_names(mod)[1]}"
                for t in owned:
                    stage_of.setdefault(t, inner if self.adapter.tensor_paths[t].endswith(down) else i)
                if len(stage_of) == len(tensors):
                    raise _Stop

            return hook

        handles = []
        owners: dict[str, list[str]] = {}
        for t in tensors:
            path = self.adapter.tensor_paths[t]
            if self.adapter.experts_of(t):
                owners.setdefault(path.rpartition(".")[0], []).append(t)
            else:
                handles.append(first.get_submodule(path).register_forward_pre_hook(make_hook(t)))
        handles += [first.get_submodule(owner).register_forward_pre_hook(make_experts_hook(owned)) for owner, owned in owners.items()]
        try:
            first(self._hidden[0], **self._kwargs[0][index0])
        except _Stop:
            pass
        finally:
            for hd in handles:
                hd.remove()
        return stage_of

    # -- the protocol ------------------------------------------------------------------
    @torch.no_grad()
    def layer_stats(self, model: nn.Module, layer: int, targets: list[Any]) -> dict[str, LayerStats]:
        """Input covariances (X^T X / N) of ``targets`` of decoder layer ``layer`` (1-based).

        With ``target`` > 0 and anything compressed upstream of these inputs, each also
        carries ``cross_cov`` (see the class) against the dense model's inputs.
        """
        if self.fisher is not None:  # first, while nothing is compressed and no hidden states are held: the peaks do not add
            self.fisher.row_sums(model)
        start = time.perf_counter()
        index0 = layer - 1
        if index0 < self._last:
            self._reset()  # a new pass over the layers (e.g. after the allocator's dense pass)
        self._last = index0
        paths = [t.path for t in targets]
        experts = {t.path: t.experts for t in targets if t.experts}
        prefix = self._prefix(model, index0)
        reference = self.target > 0 and bool(prefix)  # with nothing compressed X_ref = X
        if self.target > 0:
            self._remember_dense(model, index0, targets)
            if reference:
                self._advance_ref(model, index0)
        # per-expert statistics (token counts differ between experts) are not kept on disk
        cache = None if experts else self._cache_path(model, index0, prefix, reference)
        found = None
        if cache is not None and cache.is_file() and self.track_sparsity is None:
            try:
                blob = torch.load(cache, map_location="cpu", weights_only=True)
                if all(p in blob["index"] for p in paths) and "abs" in blob and (not reference or blob.get("cross")):
                    found = self._from_blob(blob, paths, reference)
            except Exception:  # a truncated or foreign file: recompute
                pass
        if self._sharing() and not all(self.shard.all_gather(found is not None)):
            found = None  # the processes compute together or not at all
        if found is not None:
            self.hits += 1
            self.seconds += time.perf_counter() - start
            return self._with_fisher(model, self._blend(found))
        self.misses += 1
        self._advance(model, index0)
        out, tokens = self._compute(model, index0, paths, reference, experts)
        if cache is not None:
            self._store(cache, out, tokens)
        self.layers_computed.append(layer)
        self.seconds += time.perf_counter() - start
        blended = self._blend(out)
        for p, n in experts.items():  # one entry per expert, None for an expert no calibration token reached
            blended[p] = [blended.pop(f"{p}#{e}", None) for e in range(n)]
        return self._with_fisher(model, blended)

    def _with_fisher(self, model: nn.Module, stats: dict[str, Any]) -> dict[str, Any]:
        """Each entry with its rows' Fisher sums, when this provider carries a gradient pass (fwhiten)."""
        return stats if self.fisher is None else with_output_fisher(stats, self.fisher.row_sums(model))

    def _blend(self, stats: dict[str, LayerStats]) -> dict[str, LayerStats]:
        """cross_cov = C + target * (P - C): the cross-covariance against the blended reference input."""
        if self.target == 1.0:
            return stats
        done: dict[int, LayerStats] = {}  # siblings keep sharing one object
        for p, s in stats.items():
            if s.cross_cov is not None and id(s) not in done:
                done[id(s)] = LayerStats(s.input_cov, s.tokens, s.input_cov + self.target * (s.cross_cov - s.input_cov), s.input_abs_mean)
        return {p: done.get(id(s), s) for p, s in stats.items()}

    def _compute(
        self, model: nn.Module, index0: int, paths: list[str], reference: bool, experts: Mapping[str, int] | None = None
    ) -> tuple[dict[str, LayerStats], int]:
        """Statistics of the linears at ``paths``; for a stacked expert projection (in ``experts``), one entry per
        expert that calibration tokens were routed to, keyed ``path#e``."""
        experts = experts or {}
        layers = self.adapter.layers(model)
        accum: dict[str, torch.Tensor] = {}
        cross: dict[str, torch.Tensor] = {}
        absum: dict[str, torch.Tensor] = {}  # per input channel, sum |x| (asvd's scale)
        groups: dict[str, int] = {}  # path -> index of a distinct input (q, k, v share one)
        seen_inputs: list[tuple[torch.Tensor, str]] = []
        fired: set[str] = set()
        ref_x: dict[str, torch.Tensor] = {}
        small: dict[str, list[float]] = {}
        tokens = 0

        def stop_when_done(path: str) -> None:
            fired.add(path)
            if len(fired) == len(paths):
                raise _Stop  # the rest of the layer is not needed for these inputs

        def make_ref_hook(path: str):
            def hook(_mod: nn.Module, args: tuple, _out: Any) -> None:
                ref_x[path] = args[0]
                stop_when_done(path)

            return hook

        def make_hook(path: str):
            def hook(_mod: nn.Module, args: tuple, _out: Any) -> None:
                x = args[0]
                # Same tensor object as a sibling's input (q, k, v; gate, up): reuse its product.
                # The reference is held for the batch so that no later input can reuse its memory.
                sibling = next((q for t, q in seen_inputs if t is x), None)
                if sibling is not None and sibling != path:
                    groups[path] = groups[sibling]
                    stop_when_done(path)
                    return
                if sibling is None:
                    seen_inputs.append((x, path))
                groups.setdefault(path, len(groups))
                x2 = x.detach().reshape(-1, x.shape[-1]).float()
                _accumulate(accum, path, x2.mT @ x2)
                _accumulate(absum, path, x2.abs().sum(0))
                if reference:
                    r2 = ref_x[path].detach().reshape(-1, x.shape[-1]).float()
                    _accumulate(cross, path, x2.mT @ r2)
                if self.track_sparsity is not None:
                    thr = self.track_sparsity * float(x2.abs().max())
                    s = small.setdefault(path, [0.0, 0.0])
                    s[0] += float((x2.abs() < thr).sum())
                    s[1] += x2.numel()
                stop_when_done(path)

            return hook

        owners: dict[str, list[str]] = {}  # experts module -> its requested projections
        for p in experts:
            owners.setdefault(p.rpartition(".")[0], []).append(p)
        expert_tokens: dict[str, int] = {}
        ref_in: dict[str, torch.Tensor] = {}

        def make_experts_ref_hook(owner: str):
            def hook(_mod: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
                ref_in[owner] = _experts_inputs(args, kwargs)[0]
                for p in owners[owner]:
                    stop_when_done(p)

            return hook

        def make_experts_hook(owner: str):
            def hook(mod: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
                hidden, index, _weights = _experts_inputs(args, kwargs)
                ours = expert_inputs(mod, hidden, index, owners[owner])
                if reference:  # the dense stream's inputs of the same tokens, through the dense up projection
                    dense_up = self._dense.get(index0, {}).get(f"{owner}.{expert_projection_names(mod)[0]}")
                    theirs = expert_inputs(mod, ref_in[owner], index, owners[owner], up_weight=dense_up)
                for p, e, n, a in ours:
                    key, a = f"{p}#{e}", a.float()
                    _accumulate(accum, key, a.mT @ a)
                    _accumulate(absum, key, a.abs().sum(0))
                    if reference:
                        _accumulate(cross, key, a.mT @ next(theirs)[3].float())
                    expert_tokens[key] = expert_tokens.get(key, 0) + n
                for p in owners[owner]:
                    stop_when_done(p)

            return hook

        def run(h: torch.Tensor, kw: dict[str, Any], make: Any) -> None:
            handles = [model.get_submodule(p).register_forward_hook(make(p)) for p in paths if p not in experts]
            owner_hook = make_experts_ref_hook if make is make_ref_hook else make_experts_hook
            handles += [model.get_submodule(o).register_forward_pre_hook(owner_hook(o), with_kwargs=True) for o in owners]
            fired.clear()
            try:
                layers[index0](h, **kw)
            except _Stop:
                pass
            finally:
                for hd in handles:
                    hd.remove()

        for b, (h, by_layer) in enumerate(zip(self._hidden or [], self._kwargs)):
            kw = by_layer[index0]
            if reference:
                assert self._ref is not None
                ref_x.clear()
                with self._as_dense(model, index0):
                    run(self._ref[b], kw, make_ref_hook)
            seen_inputs.clear()
            run(h, kw, make_hook)
            tokens += h.shape[0] * h.shape[1]
        ref_x.clear()
        ref_in.clear()
        if self._sharing():
            tokens = self._sum_over_processes(accum, cross if reference else None, tokens, expert_tokens, small, absum)
        # Distinct inputs, in a stable order; every path points at one of them.
        linear_paths = [p for p in paths if p not in experts]
        sources = {}
        for p in linear_paths:
            source = next((q for q in linear_paths if q in accum and groups.get(q) == groups.get(p)), p)
            sources[p] = source
        stats_by_source = {
            q: LayerStats(accum[q] / tokens, tokens, cross[q] / tokens if reference else None, absum[q] / tokens) for q in dict.fromkeys(sources.values())
        }
        out = {p: stats_by_source[sources[p]] for p in linear_paths}
        for key, n in expert_tokens.items():
            out[key] = LayerStats(accum[key] / n, n, cross[key] / n if reference else None, absum[key] / n)
        for p, (a, b) in small.items():
            self.sparsity[p] = a / max(b, 1)
        for p in linear_paths:
            if p not in self.sparsity and sources[p] in self.sparsity:
                self.sparsity[p] = self.sparsity[sources[p]]
        return out, tokens

    def _sum_over_processes(
        self,
        accum: dict[str, torch.Tensor],
        cross: dict[str, torch.Tensor] | None,
        tokens: int,
        expert_tokens: dict[str, int],
        small: dict[str, list[float]],
        absum: dict[str, torch.Tensor],
    ) -> int:
        """Add this process's sums to the others' in place (all-reduce over the shard's gloo group), in the same key
        order everywhere; a sum another process has and this one lacks (an expert no token of its share reached)
        starts at zero. Every process ends with the same bits. Returns the total token count."""
        import torch.distributed as dist

        metas = self.shard.all_gather({"tokens": tokens, "experts": expert_tokens, "small": small, "shapes": {k: tuple(v.shape) for k, v in accum.items()}})
        shapes: dict[str, tuple[int, ...]] = {}
        for m in metas:
            shapes.update(m["shapes"])
        for key in sorted(shapes):
            for sums in (accum, cross) if cross is not None else (accum,):
                if key not in sums:
                    sums[key] = torch.zeros(shapes[key], dtype=torch.float64)
                dist.all_reduce(sums[key], group=self.shard.group)
            if key not in absum:
                absum[key] = torch.zeros(shapes[key][-1], dtype=torch.float64)
            dist.all_reduce(absum[key], group=self.shard.group)
        for key in sorted({k for m in metas for k in m["experts"]}):
            expert_tokens[key] = sum(m["experts"].get(key, 0) for m in metas)
        for key in sorted({k for m in metas for k in m["small"]}):
            small[key] = [sum(m["small"].get(key, [0.0, 0.0])[i] for m in metas) for i in (0, 1)]
        return sum(m["tokens"] for m in metas)

    @staticmethod
    def _from_blob(blob: dict[str, Any], paths: list[str], reference: bool) -> dict[str, LayerStats]:
        """The stored statistics of ``paths``; modules that shared inputs (q, k, v) share one object again."""
        by_index: dict[int, LayerStats] = {}
        out = {}
        for p in paths:
            i = blob["index"][p]
            if i not in by_index:
                cross = blob["cross"][i].to(torch.float64) if reference else None
                by_index[i] = LayerStats(blob["covs"][i].to(torch.float64), int(blob["tokens"]), cross, blob["abs"][i].to(torch.float64))
            out[p] = by_index[i]
        return out

    def _store(self, cache: Path, stats: dict[str, LayerStats], tokens: int) -> None:
        covs: list[torch.Tensor] = []
        cross: list[torch.Tensor] = []
        abs_means: list[torch.Tensor] = []
        index: dict[str, int] = {}
        seen: dict[int, int] = {}
        for p, s in stats.items():
            if id(s.input_cov) not in seen:  # the sums' fp64, so that a cache hit gives the bits of computing afresh
                seen[id(s.input_cov)] = len(covs)
                covs.append(s.input_cov.to(torch.float64))
                assert s.input_abs_mean is not None
                abs_means.append(s.input_abs_mean.to(torch.float64))
                if s.cross_cov is not None:
                    cross.append(s.cross_cov.to(torch.float64))
            index[p] = seen[id(s.input_cov)]
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".tmp{os.getpid()}")
            torch.save({"covs": covs, "cross": cross, "abs": abs_means, "index": index, "tokens": tokens}, tmp)
            os.replace(tmp, cache)
        except OSError:  # a read-only or full cache never breaks a run
            pass

    def _staged(self) -> bool | None:
        """Whether decompose_model asked for these statistics in stages: only for a method that reads them (not the
        allocator of a data-free method, nor fwsvd, whose solves read the gradient pass), and only once asked."""
        if self.spec is None:
            return None
        from .methods import needs_calibration

        solves_read_these = needs_calibration(self.spec.method) and self.spec.method not in GRADIENT_ONLY_METHODS
        return bool(self.spec.calib_staged and solves_read_these and self.hits + self.misses > 0)

    def describe(self) -> dict[str, Any]:
        out = dict(self.record)
        staged = self._staged()
        out.update(
            batch=self.batch_size,
            sequential=True,
            target=self.target,
            staged=staged,
            stage_order=self.stage_order if staged else None,
            layers_computed=self.layers_computed,
            cache={"dir": None if self.cache_dir is None else str(self.cache_dir), "hits": self.hits, "misses": self.misses},
            seconds=round(self.seconds, 3),
        )
        if self._sharing():
            out["shared"] = {"processes": self.shard.world, "batches_per_process": [len(self._batch_starts(r)) for r in range(self.shard.world)]}
        if self.allocation is not None:
            out["allocation"] = self.allocation
        if self.fisher is not None:
            fisher = self.fisher.describe()
            kept = ("statistics", "batch", "grad_checkpoint", "checkpoint_layers", "held_bytes_first_batch", "held_budget_bytes",
                    "held_by_device", "linears_in_fp32", "cache", "seconds", "shared")  # fmt: skip
            out["fisher"] = {k: fisher[k] for k in kept if k in fisher}
        return out

    def release(self) -> None:
        """Drop the held hidden states and dense modules (call after decomposition to return their memory)."""
        self._reset()
        self._last = -1  # the Fisher row sums stay: small, and taken from the dense model, which is gone by now


_HEAD_CHUNK_ELEMENTS = 1 << 23  # logits per chunk of the fused head: two 32 MiB fp32 buffers at once (smaller chunks ran slower on the CPU)


def _sequence_labels(ids: torch.Tensor) -> torch.Tensor:
    """Next-token labels of each sequence; the last position predicts nothing (-100)."""
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = -100
    return labels


def _head_gradient(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor, scale: float) -> torch.Tensor:
    """d(scale * sum of the cross-entropies)/d(hidden) for logits = head(hidden), computed in chunks of positions
    so that the batch's logits, their softmax and their gradient never exist whole (3 x B x T x vocab floats at
    once in autograd's way). The rounding follows autograd's: logits in the head's dtype, softmax in fp32, the
    gradient cast back to the head's dtype before the product with its weight, and the softmax formed as the
    cross-entropy's backward forms it, exp(log_softmax z)."""
    flat = hidden.detach().flatten(0, -2)
    targets = labels.flatten().to(flat.device)
    out = torch.empty_like(flat)
    dtype = head.weight.dtype
    # A CPU that multiplies half precision slowly gets the products in fp32, rounded where autograd's are.
    weight, bias = head.weight, head.bias
    if slow_half_products_on(weight):
        weight, bias = weight.float(), None if bias is None else bias.float()
    step = max(1, _HEAD_CHUNK_ELEMENTS // head.weight.shape[0])
    for s in range(0, flat.shape[0], step):
        logits = torch.nn.functional.linear(flat[s : s + step].to(weight.dtype), weight, bias).to(dtype)
        p = torch.log_softmax(logits.float(), dim=-1).exp_()
        t = targets[s : s + step]
        rows = (t >= 0).nonzero().squeeze(1)
        p[rows, t[rows]] -= 1.0
        p[t < 0] = 0.0
        out[s : s + step] = p.mul_(scale).to(dtype).to(weight.dtype) @ weight
    return out.view_as(hidden)


def _head_returns_logits(model: nn.Module, head: nn.Module, device: torch.device) -> bool:
    """Whether the model returns its output head's result as its logits, untouched (no soft-capping or scaling
    after it), probed with a two-token forward."""
    seen: list[Any] = []
    handle = head.register_forward_hook(lambda _m, _a, out: seen.append(out))
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device), use_cache=False).logits
    finally:
        handle.remove()
    return len(seen) == 1 and logits is seen[0]


def return_freed_heap() -> bool:
    """Hand the free memory of the C heap back to the OS (glibc's ``malloc_trim``); False where there is none.

    After a transient like the gradient pass's graph, glibc keeps most freed blocks mapped (its mmap threshold
    rises with the sizes freed), so the process's RSS stays at the pass's peak and whatever runs next adds to it:
    on SmolLM2, 114 MiB held after a checkpointed pass at ``grad_batch=2`` and 358 MiB after a plain one."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # another libc (musl): nothing to hand back this way
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True


# The plain pass may hold this share of the memory free when it starts; past it, the layers are checkpointed. The
# rest is left for the backward's own gradients, the readers' products and the chunked head.
_HELD_SHARE = 0.5
class _OverHeldBudget(Exception):
    """Raised inside a forward of the gradient pass once it holds more than its budget (caught by _GradientStep)."""


def _model_devices(model: nn.Module) -> list[torch.device]:
    """The devices that hold the model's weights (a sharded model's every GPU; offloaded "meta" ones not counted)."""
    found = {t.device for t in [*model.parameters(), *model.buffers()] if t.device.type != "meta"}
    return sorted(found, key=str)


def _held_budgets(model: nn.Module) -> dict[str, int | None]:
    """{device: the bytes the first batch may hold there}: _HELD_SHARE of the memory free on each of the model's
    devices (each GPU of a sharded model holds its own layers' activations), None where that is not known."""
    budgets: dict[str, int | None] = {}
    for device in _model_devices(model):
        free = free_memory_bytes(device)
        budgets[str(device)] = int(free * _HELD_SHARE) if free is not None else None
    return budgets


class _HeldBytes:
    """What a forward of the gradient pass leaves held for its backward: the tensors the graph saves and those
    the gradient readers keep, each storage once, the model's own parameters and buffers not counted, per device.
    Once a device passes its budget (``budgets``: {device: bytes or None}) it raises _OverHeldBudget, which stops
    the forward where it is."""

    def __init__(self, model: nn.Module, budgets: dict[str, int | None]) -> None:
        self.own = {(t.device, t.untyped_storage().data_ptr()) for t in [*model.parameters(), *model.buffers()]}
        self.seen: set[tuple[torch.device, int]] = set()
        self.by_device: dict[str, int] = {}
        self.bytes = 0
        self.budgets = budgets

    def hold(self, t: torch.Tensor) -> None:
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # a tensor subclass without one: not counted
            return
        key = (t.device, storage.data_ptr())
        if key in self.own or key in self.seen:
            return
        self.seen.add(key)
        device = str(t.device)
        self.bytes += storage.nbytes()
        held = self.by_device[device] = self.by_device.get(device, 0) + storage.nbytes()
        budget = self.budgets.get(device)
        if budget is not None and held > budget:
            raise _OverHeldBudget

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.hold(t)
        # Not t itself: a node's saved output holding its grad_fn is a reference cycle (in C++, which Python's
        # collector cannot see) that only the backward breaks, so a forward stopped over budget leaked its whole
        # graph (SmolLM2, 2 x 2048 tokens: the 2.5 GiB it held, and a peak above the plain pass's).
        return t.detach()


@dataclass(frozen=True)
class _CheckpointSite:
    """Where a forward hook runs inside a checkpointed decoder layer: which checkpoint call (``token``, the same
    object in the backward's recomputation of that call) and whether this is that recomputation."""

    token: object
    recomputing: bool


class _ReadsAcrossRecomputation:
    """Pairs the output gradient of each target inside a checkpointed layer with a reader of its input.

    The layer's first forward keeps nothing for the readers: each reader is made from the input that the
    backward's recomputation of the layer produces, so the readers hold one layer's inputs (or kernels) at a time
    instead of every layer's (SmolLM2, 2 x 2048 tokens: 1.6 GB). A call is known by its checkpoint call, its name
    and its place among that name's calls there, which the recomputation repeats in order. The gradient of a
    layer's last target arrives before the recomputation (its node runs before it unpacks a saved tensor), so
    whichever of the two comes first waits for the other."""

    def __init__(self) -> None:
        self._waiting: dict[tuple[Any, ...], tuple[bool, Any]] = {}  # key -> (is a reader, the reader or gradient)
        self._consume: dict[tuple[Any, ...], Any] = {}  # key -> consume(read, g)
        self._calls: dict[tuple[Any, ...], int] = {}

    def _key(self, site: _CheckpointSite, name: Any) -> tuple[Any, ...]:
        counted = (site.token, site.recomputing, name)
        n = self._calls.get(counted, 0)
        self._calls[counted] = n + 1
        return (site.token, name, n)

    def forward(self, site: _CheckpointSite, name: Any, out: torch.Tensor, consume: Any) -> None:
        """The first forward: ``consume(read, g)`` runs once both the gradient of ``out`` and the reader are in."""
        key = self._key(site, name)
        self._consume[key] = consume
        out.register_hook(lambda g: self._meet(key, False, g))

    def recomputed(self, site: _CheckpointSite, name: Any, read: Any) -> None:
        self._meet(self._key(site, name), True, read)

    def _meet(self, key: tuple[Any, ...], is_reader: bool, value: Any) -> None:
        other = self._waiting.pop(key, None)
        if other is None:
            self._waiting[key] = (is_reader, value)
            return
        read, g = (value, other[1]) if is_reader else (other[1], value)
        self._consume.pop(key)(read, g)

    def finish(self) -> None:
        """After a backward. A reader left waiting had no gradient (its output does not reach the loss: nothing to
        add); a gradient left waiting would be a lost read, so it is an error."""
        lost = [key[1] for key, (is_reader, _) in self._waiting.items() if not is_reader]
        self._waiting.clear()
        self._consume.clear()
        self._calls.clear()
        if lost:
            raise RuntimeError(f"the gradient pass: the checkpointed recomputation never reached {lost[0]}; grad_checkpoint=false avoids it")


class _GradientStep:
    """``step(ids)``: one forward and backward of the gradient pass (made by _loss_backward); ``step.read_gradient``
    pairs a target's output gradient with a reader of its input, and ``step.hold(t)`` counts a tensor kept until
    the backward.

    With ``checkpointing`` None (auto) the first batch runs plain while its held bytes are counted per device. If
    they pass a device's budget (``budgets``) the forward stops there, the decoder layers are checkpointed from
    then on, and the batch runs again: the same sums (recomputation is deterministic), in bounded memory. Later
    batches are no larger than the first, so only it is counted. ``held_bytes`` is that count (where it stopped,
    if it did)."""

    def __init__(
        self,
        model: nn.Module,
        run: Any,
        checkpoint_on: Any,
        checkpointing: bool | None,
        budgets: dict[str, int | None],
        linears_in_fp32: bool = False,
        sites: list[_CheckpointSite] | None = None,
    ) -> None:
        self._run = run
        self._checkpoint_on = checkpoint_on
        self._sites = sites if sites is not None else []  # innermost last, kept by _loss_backward's checkpointed layers
        self.reads = _ReadsAcrossRecomputation()
        self.checkpointing = bool(checkpointing)
        self.budgets = budgets
        self.held_bytes: int | None = None
        self.held_by_device: dict[str, int] = {}
        self.linears_in_fp32 = linears_in_fp32  # half-precision linears formed in fp32 (half_backward)
        self._meter = _HeldBytes(model, budgets) if checkpointing is None else None
        if checkpointing:
            checkpoint_on()

    def hold(self, t: torch.Tensor) -> None:
        if self._meter is not None:
            self._meter.hold(t)

    def read_gradient(self, name: Any, out: torch.Tensor, make_reader: Any, consume: Any) -> None:
        """From a forward hook: ``consume(read, g)`` once the gradient ``g`` of ``out`` is in, ``read`` from
        ``make_reader()`` -> (read, the tensor it keeps). Outside a checkpointed layer the reader is made now and
        counted as held; inside one it is made in the backward's recomputation of the layer instead
        (_ReadsAcrossRecomputation), and the first forward only hooks ``out``."""
        site = self._sites[-1] if self._sites else None
        if site is not None and not site.recomputing:
            self.reads.forward(site, name, out, consume)
            return
        read, kept = make_reader()
        if site is not None:
            self.reads.recomputed(site, name, read)
            return
        self.hold(kept)
        out.register_hook(lambda g: consume(read, g))

    def __call__(self, ids: torch.Tensor) -> None:
        meter = self._meter
        if meter is None:
            self._run(ids)
            self.reads.finish()
            return
        over = False
        try:
            with torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda t: t):
                self._run(ids)
        except _OverHeldBudget:
            over = True
        self._meter, self.held_bytes, self.held_by_device = None, meter.bytes, meter.by_device
        self.reads.finish()
        if over:
            return_freed_heap()  # the stopped forward's graph is gone; glibc would keep its pages (1.7 GiB measured)
            self._checkpoint_on()
            self.checkpointing = True
            self._run(ids)
            self.reads.finish()

    def describe(self) -> dict[str, Any]:
        known = [b for b in self.budgets.values() if b is not None]
        out = {
            "checkpoint_layers": self.checkpointing,
            "held_bytes_first_batch": self.held_bytes,
            "held_budget_bytes": sum(known) if known else None,  # over every device; each has its own (held_by_device)
            "linears_in_fp32": self.linears_in_fp32,
        }
        if len(self.budgets) > 1:
            out["held_by_device"] = {d: {"held_bytes": self.held_by_device.get(d, 0), "budget_bytes": b} for d, b in self.budgets.items()}
        return out


@contextmanager
def _loss_backward(model: nn.Module, checkpoint_layers: bool | None) -> Iterator[_GradientStep]:
    """Yields ``step(ids)`` (a _GradientStep): a forward of a batch and the backward of the sum of each sequence's
    mean next-token cross-entropy, with as little of the graph held as the model allows:

    - a plain linear head whose output the model returns as its logits is replaced, for the pass, by the hidden
      states' gradient computed in chunks (_head_gradient): the logits are never held whole;
    - with ``checkpoint_layers`` each decoder layer keeps only its input and is run again when the backward reaches
      it (one more forward of the layers behind the first target), so the graph holds one layer's activations,
      not every layer's. The recomputation is deterministic: the sums are the same bits as without it. None
      (auto) checkpoints only once the first batch would hold more than _HELD_SHARE of the memory free now.

    Forward hooks inside a checkpointed layer run again in the recomputation (the whole layer: no early stop);
    tensor hooks they register there never fire (the backward runs on the first forward's graph).
    ``step.read_gradient`` takes a gradient reader in whichever of the two runs it belongs (_ReadsAcrossRecomputation)."""
    from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

    from .architectures import adapter_for_model

    device = next(model.parameters()).device
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    # A head under accelerate's hook (sharded or offloaded) keeps its own forward: the hook places its weight.
    fused = type(head) is nn.Linear and not hasattr(head, "_hf_hook") and _head_returns_logits(model, head, device)
    replaced: list[tuple[nn.Module, Any]] = []  # (module, its instance's own forward or None), put back at the end
    hidden: list[torch.Tensor] = []

    sites: list[_CheckpointSite] = []
    in_backward = [False]

    def checkpointed(block: nn.Module):
        inner = block.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            token = object()

            def body(*a: Any, **kw: Any) -> Any:  # run twice: the forward, then the backward's recomputation
                sites.append(_CheckpointSite(token, in_backward[0]))
                try:
                    return inner(*a, **kw)
                finally:
                    sites.pop()

            # The whole layer is recomputed (no early stop): the readers need every target's forward hook there.
            with set_checkpoint_early_stop(False):
                return checkpoint(body, *args, use_reentrant=False, preserve_rng_state=False, **kwargs)

        return forward

    def checkpoint_on() -> None:
        for block in adapter_for_model(model).layers(model):  # the backward runs through all behind the first target
            replaced.append((block, block.__dict__.get("forward")))
            block.forward = checkpointed(block)

    def head_forward(x: torch.Tensor) -> torch.Tensor:
        hidden.append(x)
        return x.new_empty(*x.shape[:-1], 0)  # the model passes it through untouched (probed)

    def run(ids: torch.Tensor) -> None:
        labels = _sequence_labels(ids)
        predicted = ids.shape[1] - 1  # each sequence's mean: every one has the same T - 1 predicted tokens
        with torch.enable_grad():
            logits = model(input_ids=ids, use_cache=False).logits
            in_backward[0] = True
            try:
                if fused:
                    h = hidden.pop()
                    if h.requires_grad:  # the graph starts at the first target, upstream of the head
                        h.backward(_head_gradient(h, head, labels, 1.0 / predicted))
                else:
                    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), reduction="sum")
                    (nll / predicted).backward()
            finally:
                in_backward[0] = False

    try:
        if fused:
            replaced.append((head, head.__dict__.get("forward")))
            head.forward = head_forward
        budgets = _held_budgets(model) if checkpoint_layers is None else {}
        with linears_in_fp32(model) as in_fp32:
            yield _GradientStep(model, run, checkpoint_on, checkpoint_layers, budgets, in_fp32, sites)
    finally:
        for m, own in reversed(replaced):
            if own is None:
                del m.forward
            else:
                m.forward = own


def fisher_row_sums(
    model: nn.Module,
    paths: Sequence[str],
    input_ids: torch.Tensor,
    batch_size: int = 2,
    checkpoint_layers: bool | None = None,
    report: dict[str, Any] | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """({path: f}, tokens): f_i = sum over the sequences of sum_j (dL/dW_ij)^2, W the (out x in) weight of the
    linear at path and L the sequence's language-model loss (mean next-token cross-entropy), each squared
    gradient one sequence's (the empirical Fisher).

    With ``batch_size`` >= 2, the targets are read in batches of that many sequences (_batched_fisher_pass),
    with no weight gradient at all: on the CPU 1.3-1.6x faster than one sequence at a time on SmolLM2 and 2.4x at
    Llama-2-7B's shapes (benchmarks/gradient_pass.py), for a memory beyond inference of one batch's activations
    and their backward. At 1 the pass runs one sequence at a time and squares each weight's gradient
    (_per_sequence_fisher_pass), the least memory. ``checkpoint_layers`` recomputes each decoder layer in the
    backward instead of holding its activations (_loss_backward); None does so only when the first batch would
    hold more than _HELD_SHARE of the free memory. ``report``, if given, receives how the pass ran
    (_GradientStep.describe: whether it checkpointed, the first batch's held bytes, the budget, fp32 linears).

    A stacked expert projection (E x out x in, in either stored orientation) has f of shape (E, out), each expert's
    slice of the gradient nonzero only through the tokens the router sent to it."""
    from .modules import dense_weight_of, is_experts_module

    if not paths:
        return {}, 0
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is invalid: expected an int >= 1")
    weights: dict[str, tuple[torch.Tensor, bool]] = {}  # (param, stored in x out)
    modules: dict[str, nn.Module] = {}
    experts: dict[str, tuple[nn.Module, str]] = {}  # path -> (experts module, projection name)
    for p in paths:
        found = _lookup(model, p)
        owner = model.get_submodule(p.rpartition(".")[0]) if isinstance(found, nn.Parameter) else None
        if isinstance(found, nn.Module):
            weights[p] = (found.weight, dense_weight_of(found)[0] is not found.weight)
            modules[p] = found
        elif owner is not None and found.dim() == 3 and is_experts_module(owner):
            weights[p] = (found, bool(owner.is_transposed))
            experts[p] = (owner, p.rpartition(".")[2])
        else:
            raise SpecError(f"the gradient pass (fwsvd, fwhiten, fisher): {p} is neither a linear module nor a stacked expert projection")
    saved = [(q, q.requires_grad, q.grad) for q in model.parameters()]  # put back as they were, grads included
    was_training = model.training
    try:
        for q, _, _ in saved:
            q.requires_grad_(False)
            q.grad = None
        model.eval()  # no dropout: the Fisher of the model as it is evaluated
        with _loss_backward(model, checkpoint_layers) as step:
            if batch_size > 1:
                sums = _batched_fisher_pass(model, modules, input_ids, batch_size, step, experts)
            else:
                sums = _per_sequence_fisher_pass(model, weights, input_ids, step)
        if report is not None:
            report.update(step.describe())
    finally:
        for q, flag, grad in saved:
            q.requires_grad_(flag)
            q.grad = grad
        model.train(was_training)
        return_freed_heap()
    return {p: f.cpu() for p, f in sums.items()}, int(input_ids.numel())


def _per_sequence_fisher_pass(model: nn.Module, weights: dict[str, tuple[torch.Tensor, bool]], input_ids: torch.Tensor, step: Any) -> dict[str, torch.Tensor]:
    """Fisher row sums from one forward and backward per sequence, with each targeted weight's gradient squared
    as soon as it is complete (the way for stacked experts, whose slices see only their tokens)."""
    device = next(model.parameters()).device
    # the input dimension, summed over: the last of (..., out, in), or the one before it when stored (..., in, out)
    in_dim = {p: -2 if transposed else -1 for p, (_, transposed) in weights.items()}
    sums = {p: torch.zeros(w.sum(dim=in_dim[p]).shape, dtype=torch.float64, device=w.device) for p, (w, _) in weights.items()}

    def take(path: str):
        def hook(w: torch.Tensor) -> None:
            # Squared and summed as soon as each weight's gradient is complete, then dropped: the backward holds
            # one weight's gradient at a time, not all of them (at 7B with every layer targeted, 13 GB in bf16).
            sums[path] += w.grad.float().square().sum(dim=in_dim[path], dtype=torch.float64)
            w.grad = None

        return hook

    handles = []
    try:
        for p, (w, _) in weights.items():
            w.requires_grad_(True)
            handles.append(w.register_post_accumulate_grad_hook(take(p)))
        for i in range(input_ids.shape[0]):
            step(input_ids[i : i + 1].to(device))  # a weight the loss does not reach keeps 0
    finally:
        for h in handles:
            h.remove()
    return sums


def _gradient_row_sums_reader(x: torch.Tensor, n_out: int, kernel: torch.Tensor | None = None) -> tuple[Any, torch.Tensor | None]:
    """(read, kernel): ``read(g)`` gives the sum over the batch's sequences n of the row sums of (G_n^T X_n)^2, the
    squared gradient of a linear's weight for sequence n, from its output gradients ``g`` (B x T x out), and
    ``x`` (B x T x in) its inputs.

    Row i of G_n^T X_n squared and summed is g_i^T (X_n X_n^T) g_i: through the T x T kernel of the inputs it costs
    T^2 (in + out) a sequence instead of T in out (3x fewer flops at 128 tokens on SmolLM2's layers, ~20x at 7B
    shapes), and the reader holds the kernel, not the inputs, until the backward reaches it. A ``kernel`` of the
    same inputs (q, k and v share theirs) is reused. Long sequences through small layers take the explicit
    product instead, and hold ``x``."""
    x = x.detach().reshape(x.shape[0], -1, x.shape[-1])
    t, n_in = x.shape[1], x.shape[-1]
    if t * (n_in + n_out) <= n_in * n_out:
        if kernel is None:
            xf = x.float()
            kernel = xf @ xf.mT

        def read(g: torch.Tensor) -> torch.Tensor:
            g = g.reshape(g.shape[0], -1, g.shape[-1]).float()
            return (kernel @ g).mul_(g).sum(dim=(0, 1), dtype=torch.float64)

        return read, kernel

    def read_explicit(g: torch.Tensor) -> torch.Tensor:
        g = g.reshape(g.shape[0], -1, g.shape[-1]).float()
        return sum((g[n].mT @ x[n].float()).square().sum(dim=1, dtype=torch.float64) for n in range(x.shape[0]))

    return read_explicit, None


def _routed_gradient_row_sums_reader(x: torch.Tensor, sequence: torch.Tensor, n_out: int) -> tuple[Any, torch.Tensor]:
    """(read, kept): ``read(g)`` is the sum over sequences n of the row sums of (G_n^T X_n)^2 for one expert's
    projection, ``x`` (tokens x in) the tokens the router sent it from a whole batch, ``sequence`` each token's
    sequence and ``g`` the output gradients; ``kept`` is what ``read`` holds until then (the kernel or ``x``). The
    tokens of several sequences mix in one expert's call, so the input kernel X X^T is masked to pairs from the same
    sequence; many tokens through a small projection take the explicit products."""
    x = x.detach()
    n_in = x.shape[-1]
    if x.shape[0] * (n_in + n_out) <= n_in * n_out:
        xf = x.float()
        kernel = (xf @ xf.mT).masked_fill_(sequence[:, None] != sequence[None, :], 0)

        def read(g: torch.Tensor) -> torch.Tensor:
            g = g.float()
            return (kernel @ g).mul_(g).sum(dim=0, dtype=torch.float64)

        return read, kernel

    def read_explicit(g: torch.Tensor) -> torch.Tensor:
        g = g.float()
        return sum((g[sel].mT @ x[sel].float()).square().sum(dim=1, dtype=torch.float64) for sel in (sequence == n for n in sequence.unique()))

    return read_explicit, x


def _batched_fisher_pass(
    model: nn.Module, modules: dict[str, nn.Module], input_ids: torch.Tensor, batch_size: int, step: Any, experts: dict[str, tuple[nn.Module, str]] | None = None
) -> dict[str, torch.Tensor]:
    """Fisher row sums of linear modules and stacked expert projections (``experts``: path -> (experts module,
    projection name)) from a batched forward and backward: the loss is the sum of each sequence's mean
    cross-entropy, so a module's output gradient in sequence n is that sequence's own (nothing mixes across the
    batch), and forward hooks pair it with the module's input. An experts module runs the loop of
    :func:`~lm_eval_lowrank.modules.experts_forward` for the pass, which shows each expert's projection its tokens.
    No weight takes a gradient, and the backward goes no further up than the first targeted module."""
    from .modules import dense_weight_of, experts_forward

    device = next(model.parameters()).device
    sums: dict[str, torch.Tensor] = {}
    experts = experts or {}
    shape = {"batch": 0, "length": 0}  # of the batch in flight: an experts module sees its tokens flattened
    owned: dict[nn.Module, dict[str, str]] = {}  # experts module -> {projection name: path}
    for p, (owner, name) in experts.items():
        w = getattr(owner, name)
        sums[p] = torch.zeros(w.sum(dim=-2 if owner.is_transposed else -1).shape, dtype=torch.float64, device=w.device)
        owned.setdefault(owner, {})[name] = p

    def routed_forward(mod: nn.Module, names: dict[str, str]):
        def forward(hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
            if hidden_states.shape[0] != shape["batch"] * shape["length"]:
                raise RuntimeError(
                    f"the gradient pass: {next(iter(names.values()))} saw {hidden_states.shape[0]} tokens for a batch of {shape['batch']}x{shape['length']}; grad_batch=1 reads its weight's gradient instead"
                )
            if not hidden_states.requires_grad:  # the graph starts here, as for linears
                hidden_states = hidden_states.detach().requires_grad_(True)

            def seen(name: str, expert: int, token_idx: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
                path = names.get(name)
                if path is None or not y.requires_grad:
                    return

                def consume(read: Any, g: torch.Tensor) -> None:
                    sums[path][expert] += read(g)

                step.read_gradient((path, expert), y, lambda: _routed_gradient_row_sums_reader(x, token_idx // shape["length"], y.shape[-1]), consume)

            return experts_forward(mod, hidden_states, top_k_index, top_k_weights, on_projection=seen)

        return forward

    last: list[Any] = [None, None]  # (input, its kernel): modules that share an input, back to back, share the kernel

    def watch(path: str):
        def forward_hook(_mod: nn.Module, args: tuple, out: Any) -> None:
            if not args:
                raise RuntimeError(f"the gradient pass: {path} was called without a positional input; grad_batch=1 reads its weight's gradient instead")
            if not (isinstance(out, torch.Tensor) and out.requires_grad):
                return

            def consume(read: Any, g: torch.Tensor) -> None:
                f = read(g)
                sums[path] = f if path not in sums else sums[path] + f

            def make_reader() -> tuple[Any, torch.Tensor]:
                x = args[0]
                read, kernel = _gradient_row_sums_reader(x, out.shape[-1], last[1] if x is last[0] else None)
                last[:] = [x, kernel] if kernel is not None else [None, None]
                return read, x if kernel is None else kernel  # what the reader keeps until the backward

            step.read_gradient(path, out, make_reader, consume)

        return forward_hook

    started: list[Any] = [None, None]  # (an input, the graph's start made from it): q, k and v share theirs

    def start_graph(_mod: nn.Module, args: tuple) -> tuple | None:
        # The graph starts at the targets' own inputs: the backward stops at the first targeted layer (a module's
        # output gradient does not depend on what lies upstream of it).
        if args and isinstance(args[0], torch.Tensor) and not args[0].requires_grad:
            if args[0] is not started[0]:  # one start per input, so that the readers share its kernel
                started[:] = [args[0], args[0].detach().requires_grad_(True)]
            return (started[1], *args[1:])
        return None

    handles = [mod.register_forward_pre_hook(start_graph) for mod in modules.values()]
    handles += [mod.register_forward_hook(watch(p)) for p, mod in modules.items()]
    replaced = [(mod, mod.__dict__.get("forward")) for mod in owned]  # an instance's own forward (a hook's wrapper) is put back
    try:
        for mod, names in owned.items():
            mod.forward = routed_forward(mod, names)
        for start in range(0, input_ids.shape[0], batch_size):
            ids = input_ids[start : start + batch_size].to(device)
            shape["batch"], shape["length"] = ids.shape
            step(ids)
            last[:] = started[:] = [None, None]
    finally:
        for h in handles:
            h.remove()
        for mod, own in replaced:
            if own is None:
                del mod.forward
            else:
                mod.forward = own
    linears = {p: sums[p] if p in sums else torch.zeros(dense_weight_of(m)[0].shape[0], dtype=torch.float64, device=device) for p, m in modules.items()}
    return {**linears, **{p: sums[p] for p in experts}}


class FisherStatsProvider:
    """fwsvd's statistics: each target's Fisher row sums, from one gradient pass over the dense model.

    The pass runs at the first request, before any module is replaced, for every module the spec's layers and
    tensors select, at once (a pass per layer would cost a forward and backward of the whole model each; under a
    budget the ranks are not chosen yet). Data-parallel processes (``shard``) split the sequences round robin and
    add up their sums (all-reduce over gloo): every process ends with the same bits.

    A module's row sums depend only on the dense weights and the calibration sequences, not on which other modules
    are targeted, so the cache holds them per module under (model, data, dtype): a later configuration computes
    only the modules it has not seen, and a sweep over ranks on the same layers pays for the gradients once.
    """

    def __init__(
        self,
        model: nn.Module,
        adapter: Any,
        input_ids: torch.Tensor,
        spec: DecompositionSpec,
        record: dict[str, Any] | None = None,
        cache_dir: Path | None = None,
        model_key: str | None = None,
        shard: Any = None,
    ) -> None:
        self.adapter = adapter
        self.input_ids = input_ids
        self.spec = spec
        self.shard = shard  # data-parallel processes (decompose.ProcessShard) that split the sequences
        self.sequences_per_process: list[int] | None = None  # set when the pass was split
        self.record = dict(record or {})
        self.allocation: dict[str, Any] | None = None
        self.seconds = 0.0
        self.cache_dir = cache_dir
        self.model_key = model_key
        self.hits = 0  # modules served from the cache
        self.misses = 0  # modules whose gradients were computed
        self.batch: int | None = None  # sequences per backward, once the pass ran
        self.pass_report: dict[str, Any] = {}  # how the pass ran (checkpointed or not, held bytes), once it ran
        self._fisher: dict[str, torch.Tensor] | None = None
        self._tokens = 0

    def _cache_path(self, model: nn.Module) -> Path | None:
        if self.cache_dir is None or self.model_key is None:
            return None
        data = {k: self.record.get(k) for k in ("source", "n", "len", "seed")}
        data["tokens"] = tokens_digest(self.input_ids)  # another data folder, file or tokenizer: other gradients
        key = {"v": FISHER_VERSION, "data": data, "dtype": str(next(model.parameters()).dtype)}
        return self.cache_dir / self.model_key / f"fisher-{_sha(key)}.pt"

    def _read_cache(self, cache: Path | None) -> tuple[dict[str, torch.Tensor], int]:
        if cache is None or not cache.is_file():
            return {}, 0
        try:
            blob = torch.load(cache, map_location="cpu", weights_only=True)
            return dict(blob["fisher"]), int(blob["tokens"])
        except Exception:  # a torn or foreign file is recomputed, never fatal
            return {}, 0

    def _write_cache(self, cache: Path, fisher: dict[str, torch.Tensor], tokens: int) -> None:
        merged, old_tokens = self._read_cache(cache)  # another process may have added modules meanwhile
        if old_tokens not in (0, tokens):
            merged = {}
        merged.update(fisher)
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".tmp{os.getpid()}")
            torch.save({"fisher": merged, "tokens": tokens}, tmp)
            os.replace(tmp, cache)
        except OSError:  # a read-only or full cache never breaks a run
            pass

    def _compute(self, model: nn.Module) -> None:
        from .plan import candidate_paths

        paths = candidate_paths(self.spec, model.config, adapter=self.adapter)  # a budget's too, before its ranks
        start = time.perf_counter()
        cache = self._cache_path(model)
        stored, tokens = self._read_cache(cache)
        wanted = [p for p, _ in paths]
        missing = [p for p in wanted if p not in stored]
        if self.shard is not None:  # the processes compute the same modules, whatever each one's cache held
            union = set().union(*self.shard.all_gather(missing))
            missing = [p for p in wanted if p in union]
        fisher = {p: stored[p] for p in wanted if p in stored and p not in missing}
        self.hits, self.misses = len(fisher), len(missing)
        if missing:
            n, world = self.input_ids.shape[0], self.shard.world if self.shard is not None else 1
            split = self.shard is not None and n >= world
            ids = self.input_ids[self.shard.rank :: world] if split else self.input_ids
            self.batch = self.spec.grad_batch
            fresh, _ = fisher_row_sums(model, missing, ids, batch_size=self.batch, checkpoint_layers=self.spec.grad_checkpoint, report=self.pass_report)
            if split:
                import torch.distributed as dist

                for p in missing:  # the same order in every process
                    dist.all_reduce(fresh[p], group=self.shard.group)
                self.sequences_per_process = [len(range(r, n, world)) for r in range(world)]
            tokens = int(self.input_ids.numel())
            fisher.update(fresh)
            if cache is not None:
                self._write_cache(cache, fresh, tokens)
        self._fisher, self._tokens = fisher, tokens
        self.seconds = time.perf_counter() - start

    @property
    def fisher(self) -> FisherStatsProvider:
        """The gradient pass, as a sequential provider carrying one names it (fwsvd's provider is the pass itself)."""
        return self

    def row_sums(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """{path: f} for every candidate module (E x out for stacked experts); the pass runs at the first call,
        which must come before any module is replaced."""
        if self._fisher is None:
            self._compute(model)
        assert self._fisher is not None
        return self._fisher

    def layer_stats(self, model: nn.Module, layer: int, targets: list[Any]) -> dict[str, LayerStats]:
        self.row_sums(model)
        assert self._fisher is not None
        out: dict[str, Any] = {}
        for t in targets:
            f = self._fisher.get(t.path)
            if f is None:
                continue
            if f.dim() == 1:
                out[t.path] = LayerStats(None, self._tokens, output_fisher=f)
            else:  # per expert; one that no calibration token reached has no gradient, and is solved data-free
                out[t.path] = [LayerStats(None, self._tokens, output_fisher=fe) if float(fe.max()) > 0 else None for fe in f]
        return out

    def unshare(self) -> None:
        """Run the whole pass in this process alone (the others stopped calibrating)."""
        self.shard = None

    def describe(self) -> dict[str, Any]:
        out = dict(self.record)
        out.update(
            statistics="Fisher row sums: squared gradients of the LM loss per sequence, dense model",
            batch=self.batch,
            grad_checkpoint="auto" if self.spec.grad_checkpoint is None else self.spec.grad_checkpoint,
            checkpoint_layers=self.pass_report.get("checkpoint_layers"),  # None: no pass ran (every module cached)
            held_bytes_first_batch=self.pass_report.get("held_bytes_first_batch"),
            held_budget_bytes=self.pass_report.get("held_budget_bytes"),
            **({"held_by_device": self.pass_report["held_by_device"]} if "held_by_device" in self.pass_report else {}),
            linears_in_fp32=self.pass_report.get("linears_in_fp32"),  # half precision on a CPU slow at it (half_backward)
            sequential=False,
            cache={"dir": None if self.cache_dir is None else str(self.cache_dir), "hits": self.hits, "misses": self.misses},
            seconds=round(self.seconds, 3),
        )
        if self.sequences_per_process is not None:
            out["shared"] = {"processes": len(self.sequences_per_process), "batches_per_process": self.sequences_per_process}
        if self.allocation is not None:
            out["allocation"] = self.allocation
        return out

    def release(self) -> None:
        self._fisher = None


# Model types whose positions index a learned (or fixed-size) table: a longer sequence cannot run at all.


def check_calibration_args(spec: DecompositionSpec, config: Any = None, eval_tasks: Iterable[str] | None = None) -> None:
    """What a calibrating spec can be refused for before the weights load: its ``calib`` sources (names, data files
    present), the no-leak rule against the evaluated tasks (``eval_tasks``, else lm_eval's command line or
    $LM_EVAL_LOWRANK_EVAL_TASKS) and ``calib_len`` against the config's positions. Nothing for a data-free spec."""
    if not spec.reads_calibration:
        return
    sources = parse_calib(spec.calib if spec.calib is not None else "wikitext_local")
    check_no_leak(sources, list(eval_tasks) if eval_tasks is not None else evaluated_tasks_from_env())
    if config is not None:
        check_calib_len(spec, config)


def check_calib_len(spec: DecompositionSpec, config: Any) -> None:
    """Refuse a ``calib_len`` longer than a model with learned absolute positions takes (GPT-2's n_positions, OPT's
    max_position_embeddings): a one-line SpecError, from the config alone, so callable before the weights load. A
    RoPE (or other) model past its max_position_embeddings only gets a warning on stderr: it runs, extrapolated.
    Nothing is checked when the spec calibrates nothing."""
    from .architectures import position_limit

    found = position_limit(config) if spec.reads_calibration else None
    if found is None or spec.calib_len <= found[1]:
        return
    field, limit, table = found
    if table:
        raise SpecError(
            f"calib_len={spec.calib_len} is invalid for this model: it takes at most {limit} positions "
            f"({field}={limit}, learned positions); use calib_len<={limit}"
        )
    message = f"[lm-eval-lowrank] warning: calib_len={spec.calib_len} is past this model's {field}={limit}; its positions beyond {limit} are extrapolated"
    if message not in _WARNED:  # once: the check before the load and the one before the first forward
        _WARNED.add(message)
        print(message, file=sys.stderr)


_WARNED: set[str] = set()


def build_stats_provider(
    spec: DecompositionSpec,
    model: nn.Module,
    tokenizer: Any,
    adapter: Any = None,
    model_id: str | None = None,
    eval_tasks: Iterable[str] | None = None,
    shard: Any = None,
) -> SequentialStatsProvider | FisherStatsProvider:
    """Sample the calibration tokens of ``spec.calib`` (after the no-leak check) and wrap them. With ``shard``
    (data-parallel processes holding the same model) each process runs its share of the batches."""
    from .architectures import adapter_for_model
    from .assets import usable_cache_dir
    from .methods import uses_reference

    if tokenizer is None:
        raise SpecError("calib: calibration needs the model's tokenizer")
    check_calib_len(spec, model.config)  # before any forward
    adapter = adapter or adapter_for_model(model)
    root = data_root()
    sources = parse_calib(spec.calib if spec.calib is not None else "wikitext_local")  # calib='' is refused there
    tasks = list(eval_tasks) if eval_tasks is not None else evaluated_tasks_from_env()
    leak = check_no_leak(sources, tasks, root)
    ids, record = calibration_tokens(spec, tokenizer, root)
    record["leak_check"] = leak
    record["data_dir"] = str(root)
    cache_dir = usable_cache_dir("calib") if spec.cache else None
    key = model_fingerprint(model, model_id) if cache_dir is not None else None
    by_allocator = spec.budget is not None and spec.allocator in GRADIENT_ALLOCATORS  # allocator=fisher: any method
    gradients = spec.method in GRADIENT_METHODS or by_allocator
    fisher = FisherStatsProvider(model, adapter, ids, spec, record=record, cache_dir=cache_dir, model_key=key, shard=shard) if gradients else None
    if spec.method in GRADIENT_ONLY_METHODS and not by_allocator:  # allocator=fisher reads the covariances too
        return fisher
    target = spec.calib_target if uses_reference(spec.method) else 0.0  # rom fits the compressed model's inputs
    return SequentialStatsProvider(
        model, adapter, ids, batch_size=spec.calib_batch, record=record, cache_dir=cache_dir, model_key=key, spec=spec, target=target, shard=shard, fisher=fisher
    )
