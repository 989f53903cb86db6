"""Local, offline benchmark tasks: generation, documented sizes, built-in prompts, a real model run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from lm_eval_lowrank import tasks as lt
from lm_eval_lowrank.cli.tasks import tasks as tasks_cmd

# name -> (documented docs of the scored split, metrics the built-in reports, built-in YAML under lm_eval/tasks)
EXPECTED: dict[str, tuple[int, set[str], str | None]] = {
    "arc_easy_local": (2376, {"acc", "acc_norm"}, "arc/arc_easy.yaml"),
    "arc_challenge_local": (1172, {"acc", "acc_norm"}, "arc/arc_challenge.yaml"),
    "boolq_local": (3270, {"acc"}, "super_glue/boolq/default.yaml"),
    "truthfulqa_mc1_local": (817, {"acc"}, "truthfulqa/truthfulqa_mc1.yaml"),
    "truthfulqa_mc2_local": (817, {"acc"}, "truthfulqa/truthfulqa_mc2.yaml"),
    "gsm8k_local": (1319, {"exact_match"}, "gsm8k/gsm8k.yaml"),
    "lambada_openai_local": (5153, {"perplexity", "acc"}, "lambada/lambada_openai.yaml"),
    "wikitext_local": (62, {"word_perplexity", "byte_perplexity", "bits_per_byte"}, "wikitext/wikitext.yaml"),
    "hellaswag_approx_local": (10042, {"acc", "acc_norm"}, "hellaswag/hellaswag.yaml"),
    "mmlu_local": (14042, {"acc"}, None),
}
# Keys that decide what a model is asked and how it is scored: they must be the built-in's.
PROMPT_KEYS = (
    "output_type",
    "doc_to_text",
    "doc_to_target",
    "doc_to_choice",
    "target_delimiter",
    "fewshot_delimiter",
    "description",
    "num_fewshot",
    "fewshot_split",
    "fewshot_config",
    "metric_list",
    "process_results",
    "filter_list",
    "generation_kwargs",
)


@pytest.fixture(scope="module")
def include_dir(tmp_path_factory) -> Path:
    # A fresh cache folder, so the test exercises generation rather than a stale copy.
    return lt.task_dir(cache_dir=tmp_path_factory.mktemp("task-cache"))


@pytest.fixture(scope="module")
def task_manager(include_dir):
    from lm_eval.tasks import TaskManager

    # The local YAMLs include the built-ins by absolute path, so lm-eval's own folder need not be
    # indexed (that index of ~14k entries costs 10 s or more on 2 busy cores).
    return TaskManager(include_path=str(include_dir), include_defaults=False)


@pytest.fixture(scope="module")
def smollm2_lm(smollm2_dir):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(smollm2_dir), dtype="float32", device="cpu", batch_size=8)


def _load_yaml(path: Path) -> dict:
    """A task YAML with its includes resolved and !function left unresolved: lm-eval 0.4.12+'s loader, else
    the older lm_eval.utils one (the floor is 0.4.10)."""
    try:
        from lm_eval.tasks._yaml_loader import load_yaml
    except ImportError:
        import yaml
        from lm_eval.utils import load_yaml_config

        def plain(value):  # its "simple" mode leaves !function as a yaml node, which compares by identity
            if isinstance(value, yaml.Node):
                return f"{value.tag} {value.value}"
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            return [plain(v) for v in value] if isinstance(value, list) else value

        return plain(load_yaml_config(str(path), mode="simple"))
    return load_yaml(path, resolve_func=False)


def _load_tasks(task_manager, names: list[str]) -> tuple[dict, set[str]]:
    """(task name -> Task, group names): TaskManager.load on lm-eval 0.4.12+, else the older get_task_dict."""
    if hasattr(task_manager, "load"):
        loaded = task_manager.load(names)
        return dict(loaded["tasks"]), set(loaded["groups"])
    from lm_eval.tasks import get_task_dict

    tasks: dict = {}
    groups: set[str] = set()

    def walk(node: dict) -> None:
        for key, value in node.items():
            if isinstance(value, dict):
                groups.add(getattr(key, "group_name", None) or str(key))
                walk(value)
            else:
                tasks[str(key)] = value

    walk(get_task_dict(names, task_manager))
    return tasks, groups


def _scored_docs(task) -> int:
    return len(task.test_docs() if task.has_test_docs() else task.validation_docs())


# ---------------------------------------------------------------- data folder


def test_missing_data_folder_from_env_is_one_line(monkeypatch, tmp_path):
    missing = tmp_path / "no-such-data"
    monkeypatch.setenv(lt.DATA_ENV, str(missing))
    with pytest.raises(lt.DataDirError) as info:
        lt.task_dir(cache_dir=tmp_path / "cache")
    msg = str(info.value)
    assert "\n" not in msg
    assert str(missing) in msg and "LM_EVAL_LOWRANK_DATA" in msg


def test_missing_default_data_folder_is_one_line(monkeypatch, tmp_path):
    checkout = tmp_path / "a" / "checkout"
    checkout.mkdir(parents=True)
    monkeypatch.delenv(lt.DATA_ENV, raising=False)
    monkeypatch.setattr(lt, "_checkout_root", lambda: checkout)
    monkeypatch.chdir(checkout)
    with pytest.raises(lt.DataDirError) as info:
        lt.data_dir()
    msg = str(info.value)
    assert "\n" not in msg
    assert str(tmp_path / "a" / "shared" / "data") in msg and "LM_EVAL_LOWRANK_DATA" in msg


def test_cli_missing_data_prints_one_error_line(tmp_path):
    missing = tmp_path / "nowhere"
    result = CliRunner().invoke(tasks_cmd, [], env={lt.DATA_ENV: str(missing)})
    assert result.exit_code == 2  # an input error, as with --data
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:")
    assert str(missing) in lines[0] and "LM_EVAL_LOWRANK_DATA" in lines[0]


def test_default_data_folder_is_beside_the_checkout(monkeypatch):
    monkeypatch.delenv(lt.DATA_ENV, raising=False)
    expected = (Path(lt.__file__).resolve().parents[2] / ".." / "shared" / "data").resolve()
    if not expected.is_dir():
        pytest.skip(f"no data folder at {expected}")
    assert lt.data_dir() == expected


# ---------------------------------------------------------------- generated folder


def test_task_dir_is_reused_and_keyed_by_data_folder(tmp_path, include_dir):
    data = lt.data_dir()
    cache = tmp_path / "cache"
    first = lt.task_dir(cache_dir=cache)
    assert lt.task_dir(cache_dir=cache) == first
    # Another data folder (symlinks to the real one) gets its own folder and its own absolute paths.
    other = tmp_path / "other-data"
    other.mkdir()
    for sub in data.iterdir():
        (other / sub.name).symlink_to(sub)
    second = lt.task_dir(other, cache_dir=cache)
    assert second != first
    assert str(other.resolve()) in (second / "arc_easy_local.yaml").read_text()
    # Every data path in the generated YAMLs is absolute: lm_eval may run from any folder.
    text = (include_dir / "mmlu" / "mmlu_local_anatomy.yaml").read_text()
    assert f'"{data}/mmlu/test/anatomy.jsonl"' in text


def test_cli_prints_the_include_path_and_lists_tasks():
    runner = CliRunner()
    result = runner.invoke(tasks_cmd, [])
    assert result.exit_code == 0, result.output
    assert Path(result.output.strip()).is_dir()
    listing = runner.invoke(tasks_cmd, ["--list"])
    assert listing.exit_code == 0, listing.output
    for name, (docs, _, _) in EXPECTED.items():
        line = next(ln for ln in listing.output.splitlines() if ln.startswith(name))
        assert str(docs) in line.split()


@pytest.mark.parametrize("name", [n for n, e in EXPECTED.items() if e[2]])
def test_prompts_and_metrics_are_the_builtin_ones(name, include_dir):
    ours = _load_yaml(include_dir / f"{name}.yaml")
    builtin = _load_yaml(lt.lm_eval_tasks_dir() / EXPECTED[name][2])
    for key in PROMPT_KEYS:
        assert ours.get(key) == builtin.get(key), key
    assert ours["dataset_path"] == "json" and ours["dataset_name"] is None
    assert not ours["tag"], "a local task must not join the built-in tags"


def test_mmlu_mirrors_the_builtin_subjects_and_categories(include_dir):
    subjects = lt._mmlu_subjects(lt.lm_eval_tasks_dir())
    assert len(subjects) == 57
    ours = _load_yaml(include_dir / "mmlu" / "mmlu_local_college_physics.yaml")
    builtin = _load_yaml(lt.lm_eval_tasks_dir() / "mmlu/default/mmlu_college_physics.yaml")
    for key in PROMPT_KEYS + ("test_split", "task_alias"):
        assert ours.get(key) == builtin.get(key), key
    assert ours["tag"] == "mmlu_local_stem_tasks"


# ---------------------------------------------------------------- through lm-eval


@pytest.mark.parametrize("name", list(EXPECTED))
def test_loads_with_the_documented_number_of_docs(name, task_manager):
    tasks, groups = _load_tasks(task_manager, [name])
    total = sum(_scored_docs(t) for t in tasks.values())
    assert total == EXPECTED[name][0]
    if name == "mmlu_local":
        assert len(tasks) == 57
        assert groups == {"mmlu_local"} | {f"mmlu_local_{c}" for c in lt.MMLU_CATEGORIES}


def _finite_metrics(row: dict) -> dict[str, float]:
    out = {}
    for key, value in row.items():
        if "," not in key or "_stderr," in key:  # "metric,filter" keys only; alias/name/sample_len are not scores
            continue
        assert isinstance(value, (int, float)) and math.isfinite(value), (key, value)
        out[key.split(",")[0]] = value
    return out


# What each smoke run evaluates, and on how many docs (lm-eval's --limit, per leaf task).
RUNS: dict[str, tuple[str, int]] = {name: (name, 2) for name in EXPECTED}
RUNS.update(
    {
        # 6-shot QA prompt times 5-13 choices per doc: one doc is enough.
        "truthfulqa_mc1_local": ("truthfulqa_mc1_local", 1),
        "truthfulqa_mc2_local": ("truthfulqa_mc2_local", 1),
        "gsm8k_local": ("gsm8k_local", 1),  # 5-shot from train, short generation (see gen_kwargs)
        "wikitext_local": ("wikitext_local", 1),  # a whole Wikipedia page
        # The group runs 57 subjects even at limit 1 (minutes on 2 busy cores); its structure is
        # checked by the load test, so the model runs one subject here.
        "mmlu_local": ("mmlu_local_abstract_algebra", 2),
    }
)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EXPECTED))
def test_runs_a_few_docs_through_smollm2(name, task_manager, smollm2_lm):
    from lm_eval import simple_evaluate

    task, limit = RUNS[name]
    kwargs = {"gen_kwargs": {"max_gen_toks": 16}} if name == "gsm8k_local" else {}
    out = simple_evaluate(
        model=smollm2_lm,
        tasks=[task],
        task_manager=task_manager,
        limit=limit,
        bootstrap_iters=0,
        log_samples=False,
        **kwargs,
    )
    metrics = _finite_metrics(out["results"][task])
    assert set(metrics) == EXPECTED[name][1]
    if "acc" in metrics:
        assert 0.0 <= metrics["acc"] <= 1.0


def test_data_env_var_selects_the_folder(monkeypatch, tmp_path):
    other = tmp_path / "data-via-env"
    other.mkdir()
    for sub in lt.data_dir().iterdir():
        (other / sub.name).symlink_to(sub)
    monkeypatch.setenv(lt.DATA_ENV, str(other))
    generated = lt.task_dir(cache_dir=tmp_path / "cache")
    assert f'"{other.resolve()}/boolq/validation.jsonl"' in (generated / "boolq_local.yaml").read_text()
