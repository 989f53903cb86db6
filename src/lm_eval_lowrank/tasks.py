"""Local, offline versions of standard lm-eval benchmarks, read from JSON Lines files.

lm-eval resolves relative ``data_files`` against the current directory, not the YAML, so
static YAML paths would break as soon as ``lm_eval`` runs from another folder. Instead the
YAMLs under ``task_configs/`` are templates: :func:`task_dir` fills in the absolute data
folder and the absolute folder of lm-eval's built-in tasks, writes the result once into
``cache_root()/tasks/<hash>`` and returns that folder for ``--include_path``.

Each local task ``include:``s the built-in YAML it stands in for and overrides only the
dataset keys, so prompts, metrics and helper functions are lm-eval's own (no copies).

Kept import-light: no torch, no datasets, and lm_eval is only located, not imported.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .assets import cache_root

DATA_ENV = "LM_EVAL_LOWRANK_DATA"
TEMPLATES = Path(__file__).resolve().parent / "task_configs"
_TEMPLATE_SUFFIX = ".yaml.tmpl"
_TOKEN = re.compile(r"@[A-Z_]+@")
_MANIFEST = "lowrank_tasks.json"  # written last: its presence marks a complete folder
# Bump when the generation logic (not the templates, which are hashed) changes.
_LAYOUT_VERSION = "1"

MMLU_CATEGORIES = ("stem", "other", "social_sciences", "humanities")


class DataDirError(FileNotFoundError):
    """The benchmark data folder (or a file the tasks need) is missing; the message is one line."""


@dataclass(frozen=True)
class LocalTask:
    """One generated task: its name, the split it is scored on, and that split's files."""

    name: str
    split: str
    files: tuple[str, ...]  # relative to the data folder
    builtin: str  # the lm-eval built-in task it stands in for
    metrics: str
    group: str | None = None  # set for the MMLU subjects

    def docs(self, data_dir: Path) -> int:
        """Number of documents in the scored split (one JSON object per non-empty line)."""
        total = 0
        for rel in self.files:
            with open(data_dir / rel, "rb") as fh:
                total += sum(1 for line in fh if line.strip())
        return total


# name -> (template, scored split, files of that split, built-in, metrics)
_SIMPLE: dict[str, tuple[str, tuple[str, ...], str, str]] = {
    "arc_easy_local": ("test", ("arc_easy/test.jsonl",), "arc_easy", "acc, acc_norm"),
    "arc_challenge_local": ("test", ("arc_challenge/test.jsonl",), "arc_challenge", "acc, acc_norm"),
    "boolq_local": ("validation", ("boolq/validation.jsonl",), "boolq", "acc"),
    "truthfulqa_mc1_local": ("validation", ("truthfulqa/validation.jsonl",), "truthfulqa_mc1", "acc"),
    "truthfulqa_mc2_local": ("validation", ("truthfulqa/validation.jsonl",), "truthfulqa_mc2", "acc"),
    "gsm8k_local": ("test", ("gsm8k/test.jsonl",), "gsm8k", "exact_match (strict-match, flexible-extract)"),
    "lambada_openai_local": ("test", ("lambada_openai/test.jsonl",), "lambada_openai", "perplexity, acc"),
    "wikitext_local": ("test", ("wikitext/test.jsonl",), "wikitext", "word_perplexity, byte_perplexity, bits_per_byte"),
    "hellaswag_approx_local": (
        "validation",
        tuple(f"hellaswag_llamacpp/validation-0000{i}-of-00003.jsonl" for i in range(3)),
        "hellaswag (approximate, not official)",
        "acc, acc_norm",
    ),
}
# Files each task reads besides its scored split (few-shot sources); checked before writing.
_EXTRA_FILES: dict[str, tuple[str, ...]] = {
    "arc_easy_local": ("arc_easy/validation.jsonl",),
    "arc_challenge_local": ("arc_challenge/validation.jsonl",),
    "gsm8k_local": ("gsm8k/train.jsonl",),
}


def _checkout_root() -> Path:
    # src/lm_eval_lowrank/tasks.py -> the repository root is the parent of src/
    return Path(__file__).resolve().parents[2]


def data_candidates() -> list[Path]:
    """Where the data folder is looked for when ``LM_EVAL_LOWRANK_DATA`` is not set."""
    out: list[Path] = []
    for base in (_checkout_root(), Path.cwd()):
        cand = (base / ".." / "shared" / "data").resolve()
        if cand not in out:
            out.append(cand)
    return out


def data_dir() -> Path:
    """The benchmark data folder: ``$LM_EVAL_LOWRANK_DATA`` or ``../shared/data`` beside the checkout / cwd."""
    env = os.environ.get(DATA_ENV)
    if env:
        path = Path(env).expanduser().resolve()
        if not path.is_dir():
            raise DataDirError(
                f"benchmark data folder {path} (from {DATA_ENV}) does not exist; point {DATA_ENV} at the folder"
                " that holds arc_easy/, mmlu/, ..."
            )
        return path
    candidates = data_candidates()
    for cand in candidates:
        if cand.is_dir():
            return cand
    tried = " or ".join(str(c) for c in candidates)
    raise DataDirError(
        f"benchmark data folder not found: {tried}; set {DATA_ENV} to the folder that holds arc_easy/, mmlu/, ..."
    )


def lm_eval_tasks_dir() -> Path:
    """Folder of lm-eval's built-in task YAMLs, found without importing lm_eval."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("lm_eval is not installed")
    return Path(next(iter(spec.submodule_search_locations))).resolve() / "tasks"


def _mmlu_subjects(lm_tasks: Path) -> dict[str, str]:
    """subject -> category, read from the built-in per-subject YAMLs (so the split matches lm-eval's)."""
    import yaml

    subjects: dict[str, str] = {}
    for path in sorted((lm_tasks / "mmlu" / "default").glob("mmlu_*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        tag = cfg.get("tag", "")
        category = tag.removeprefix("mmlu_").removesuffix("_tasks")
        if category in MMLU_CATEGORIES:
            subjects[cfg["dataset_name"]] = category
    return subjects


def local_tasks(lm_tasks: Path | None = None) -> list[LocalTask]:
    """All generated leaf tasks, the 57 MMLU subjects last."""
    tasks = [LocalTask(name, split, files, builtin, metrics) for name, (split, files, builtin, metrics) in _SIMPLE.items()]
    for subject in sorted(_mmlu_subjects(lm_tasks or lm_eval_tasks_dir())):
        tasks.append(
            LocalTask(
                f"mmlu_local_{subject}", "test", (f"mmlu/test/{subject}.jsonl",), f"mmlu_{subject}", "acc", group="mmlu_local"
            )
        )
    return tasks


def _yaml_str(value: str) -> str:
    # The tokens sit inside double-quoted YAML strings; JSON escaping is valid there.
    return json.dumps(value)[1:-1]


def _render(template: Path, tokens: dict[str, str]) -> str:
    text = template.read_text()
    for key, value in tokens.items():
        text = text.replace(f"@{key}@", _yaml_str(value))
    leftover = _TOKEN.search(text)
    if leftover:  # a template and this module out of step: fail here, not inside lm-eval
        raise ValueError(f"unfilled token {leftover.group(0)} in {template.name}")
    return text


def _fingerprint(data: Path, lm_tasks: Path) -> str:
    h = hashlib.sha256()
    h.update(f"{_LAYOUT_VERSION}\0{data}\0{lm_tasks}\0".encode())
    try:
        from importlib.metadata import version

        h.update(version("lm_eval").encode())
    except Exception:  # a source checkout of lm-eval without metadata: the path is enough
        pass
    # Templates are hashed so an edited (editable-install) template never leaves a stale folder.
    for tmpl in sorted(TEMPLATES.rglob(f"*{_TEMPLATE_SUFFIX}")):
        h.update(tmpl.relative_to(TEMPLATES).as_posix().encode() + b"\0" + tmpl.read_bytes())
    return h.hexdigest()[:16]


def _check_files(data: Path, tasks: list[LocalTask], given: bool = False) -> None:
    """Every file the tasks read is there; the error's remedy names where ``data`` came from (passed in, or found)."""
    needed: list[str] = []
    for task in tasks:
        needed += list(task.files) + list(_EXTRA_FILES.get(task.name, ()))
        if task.group == "mmlu_local":
            needed.append(task.files[0].replace("/test/", "/dev/"))
    missing = [rel for rel in dict.fromkeys(needed) if not (data / rel).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataDirError(
            f"benchmark data folder {data} lacks {missing[0]}{more}; "
            + ("give a complete copy" if given else f"set {DATA_ENV} to a complete copy")
        )


def _write_configs(out: Path, data: Path, lm_tasks: Path) -> None:
    base = {"DATA_DIR": str(data), "LM_EVAL_TASKS": str(lm_tasks)}
    for tmpl in sorted(TEMPLATES.glob(f"*{_TEMPLATE_SUFFIX}")):
        name = tmpl.name.removesuffix(_TEMPLATE_SUFFIX)
        (out / f"{name}.yaml").write_text(_render(tmpl, base))
    mmlu_out = out / "mmlu"
    mmlu_out.mkdir()
    mmlu_t = TEMPLATES / "mmlu"
    (mmlu_out / "_mmlu_local.yaml").write_text(_render(mmlu_t / f"mmlu_local{_TEMPLATE_SUFFIX}", base))
    for category in MMLU_CATEGORIES:
        text = _render(mmlu_t / f"mmlu_local_category{_TEMPLATE_SUFFIX}", {**base, "CATEGORY": category})
        (mmlu_out / f"_mmlu_local_{category}.yaml").write_text(text)
    for subject, category in sorted(_mmlu_subjects(lm_tasks).items()):
        tokens = {**base, "SUBJECT": subject, "CATEGORY": category}
        text = _render(mmlu_t / f"mmlu_local_subject{_TEMPLATE_SUFFIX}", tokens)
        (mmlu_out / f"mmlu_local_{subject}.yaml").write_text(text)


def _check_includes(out: Path) -> None:
    # lm-eval skips a YAML whose include is missing with only a debug log, so a moved built-in
    # (another lm-eval version) would surface as "task not found"; say what is wrong instead.
    import yaml

    for path in sorted(out.rglob("*.yaml")):
        include = yaml.safe_load(path.read_text()).get("include")
        if include and not Path(include).is_file():
            raise FileNotFoundError(
                f"{path.name} includes {include}, which this lm-eval does not have (tested with lm-eval 0.4.13)"
            )


def _given_data(data: str | os.PathLike) -> Path:
    """A data folder passed in, checked; its errors do not point at ``LM_EVAL_LOWRANK_DATA``, which it overrides."""
    path = Path(data).expanduser().resolve()
    if not path.is_dir():
        raise DataDirError(f"benchmark data folder {path} does not exist; give the folder that holds arc_easy/, mmlu/, ...")
    return path


def task_dir(data: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder of ready-to-use task YAMLs for ``lm_eval --include_path`` (generated once, then reused).

    ``data`` overrides the data folder (default: :func:`data_dir`); ``cache_dir`` overrides
    ``cache_root()/tasks``. Raises :class:`DataDirError` with a one-line message when the data is missing.
    """
    data_path = _given_data(data) if data is not None else data_dir()
    lm_tasks = lm_eval_tasks_dir()
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "tasks"
    final = root / _fingerprint(data_path, lm_tasks)
    if (final / _MANIFEST).is_file():
        return final

    tasks = local_tasks(lm_tasks)
    _check_files(data_path, tasks, given=data is not None)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    try:
        _write_configs(tmp, data_path, lm_tasks)
        _check_includes(tmp)
        manifest = {"data_dir": str(data_path), "lm_eval_tasks": str(lm_tasks), "tasks": [t.name for t in tasks]}
        (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        try:
            os.replace(tmp, final)
        except OSError:
            # Another process finished the same folder first; theirs is identical.
            if not (final / _MANIFEST).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def task_table(data: str | os.PathLike | None = None) -> list[tuple[str, str, int, str]]:
    """(name, split, documents, metrics) for every top-level local task, with ``mmlu_local`` as one row."""
    data_path = _given_data(data) if data is not None else data_dir()
    tasks = local_tasks()
    _check_files(data_path, tasks, given=data is not None)
    rows = [(t.name, t.split, t.docs(data_path), t.metrics) for t in tasks if t.group is None]
    subjects = [t for t in tasks if t.group == "mmlu_local"]
    rows.append(
        (f"mmlu_local ({len(subjects)} subjects)", "test", sum(t.docs(data_path) for t in subjects), "acc (size-weighted)")
    )
    return rows


if __name__ == "__main__":
    try:
        print(task_dir())
    except DataDirError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        sys.exit(2)
