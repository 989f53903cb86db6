"""Calibration: per-layer call arguments, the no-leak rule's task discovery, the statistics caches' keys and
bits, and the checks and records around them (calibration.py)."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch

from lm_eval_lowrank.spec import DecompositionSpec, SpecError


class CharTokenizer:
    """A stand-in tokenizer for tiny models (vocab 128): one token per character."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) % 128 for c in text]}


def _ids(n: int = 8, length: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (n, length), generator=torch.Generator().manual_seed(seed))


def _provider(model, ids, **kw):
    from lm_eval_lowrank.architectures import adapter_for_model
    from lm_eval_lowrank.calibration import SequentialStatsProvider

    return SequentialStatsProvider(model, adapter_for_model(model), ids, batch_size=4, record={"source": "test", "n": len(ids), "len": ids.shape[1], "seed": 0}, **kw)


def _full_forward_covs(model, ids, paths, batch_size=4):
    """X^T X / N of each path's input, from whole-model forwards (the ground truth)."""
    sums: dict[str, torch.Tensor] = {}
    handles = []
    for p in paths:

        def hook(_m, args, _out, p=p):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[p] = sums.get(p, 0) + x.mT @ x

        handles.append(model.get_submodule(p).register_forward_hook(hook))
    with torch.no_grad():
        for i in range(0, len(ids), batch_size):
            model(input_ids=ids[i : i + batch_size], use_cache=False)
    for h in handles:
        h.remove()
    return {p: s / ids.numel() for p, s in sums.items()}


# -- 1: each layer runs with its own call arguments ----------------------------------------------


def _tiny_gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, sliding_window=4, max_position_embeddings=128,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    )  # fmt: skip
    return Gemma3ForCausalLM(cfg).eval()


def test_each_layer_is_calibrated_with_its_own_mask_and_rope():
    """Gemma-3 gives sliding and full layers their own mask and RoPE: the layers run before a request (and the
    requested one) must each get theirs, not the first layer's."""
    from lm_eval_lowrank.plan import make_plan

    model = _tiny_gemma3()
    ids = _ids()
    for layer in (3, 4):  # after a full layer; itself a full one
        targets = make_plan(DecompositionSpec.from_args({"rank": 2, "layers": str(layer), "tensors": "q|down"}), model.config).targets
        prov = _provider(model, ids)
        stats = prov.layer_stats(model, layer, targets)
        truth = _full_forward_covs(model, ids, [t.path for t in targets])
        for t in targets:
            got, want = stats[t.path].input_cov, truth[t.path]
            assert float((got - want).norm() / want.norm()) < 1e-5, (layer, t.tensor)
    # The capture pass leaves no stub behind, and holds each layer type's arguments once.
    assert all("forward" not in vars(block) for block in model.model.layers)
    kw = prov._kwargs
    assert kw[0][0] is kw[0][2] and kw[0][1] is kw[0][3] and kw[0][0] is not kw[0][1]
    assert kw[0][0]["attention_mask"] is kw[1][0]["attention_mask"]  # two batches of one shape share the mask


# -- 2: lm-eval's --tasks, as lm-eval parses it --------------------------------------------------


@pytest.mark.parametrize(
    "lead,extra",
    [
        ([], ["--tasks", "arc_easy_local", "boolq_local"]),
        ([], ["--tasks", "arc_easy_local", "--tasks", "boolq_local,lambada_openai_local"]),
        ([], ["--task", "boolq_local"]),
        ([], ["-tboolq_local"]),
        (["run"], ["--tasks=arc_easy_local,boolq_local"]),
    ],
)
def test_evaluated_tasks_are_read_as_lm_eval_reads_its_command_line(lead, extra, monkeypatch):
    from lm_eval._cli.harness import HarnessCLI

    from lm_eval_lowrank.calibration import EVAL_TASKS_ENV, evaluated_tasks_from_env

    monkeypatch.delenv(EVAL_TASKS_ENV, raising=False)
    argv = ["/x/bin/lm_eval", *lead, "--model", "hf-tucker", "--model_args", "pretrained=x,method=whiten,rank=4", *extra]
    monkeypatch.setattr(sys, "argv", list(argv))
    lm_eval_sees = HarnessCLI().parse_args().tasks
    assert evaluated_tasks_from_env(argv) == lm_eval_sees
    assert evaluated_tasks_from_env(["python", "-m", "lm_eval", *argv[1:]]) == lm_eval_sees
    assert evaluated_tasks_from_env(["/site-packages/lm_eval/__main__.py", *argv[1:]]) == lm_eval_sees  # python -m lm_eval
    assert evaluated_tasks_from_env(["/x/bin/lm-eval-lowrank", *argv[1:]]) is None  # this package's CLI, not lm-eval


@pytest.mark.parametrize("yaml_tasks", ["arc_easy_local,boolq_local", "[arc_easy_local, 'boolq_local,lambada_openai_local']"])
@pytest.mark.parametrize("cli", [[], ["--tasks", "wikitext_local"]])
def test_evaluated_tasks_are_read_from_an_lm_eval_config_file(yaml_tasks, cli, tmp_path, monkeypatch):
    """``lm_eval run --config F.yaml`` takes its tasks from the file unless the command line gives them: the no-leak
    check read only the command line, so tasks from the file were 'unknown' and a leak went unchecked."""
    from lm_eval._cli.harness import HarnessCLI
    from lm_eval.config.evaluate_config import EvaluatorConfig

    from lm_eval_lowrank.calibration import EVAL_TASKS_ENV, evaluated_tasks_from_env

    monkeypatch.delenv(EVAL_TASKS_ENV, raising=False)
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"model: hf-tucker\ntasks: {yaml_tasks}\n")
    argv = ["/x/bin/lm_eval", "run", "--config", str(cfg), "--model_args", "pretrained=x,method=whiten,rank=4", *cli]
    monkeypatch.setattr(sys, "argv", list(argv))
    tasks = EvaluatorConfig.from_cli(HarnessCLI().parse_args()).tasks
    lm_eval_sees = [t for v in ([tasks] if isinstance(tasks, str) else tasks) for t in v.split(",")]
    assert evaluated_tasks_from_env(argv) == lm_eval_sees
    assert evaluated_tasks_from_env([*argv[:2], f"-C{cfg}", *argv[4:]]) == lm_eval_sees
    (tmp_path / "eval.yaml").write_text("tasks: [1, 2\n")  # unreadable: lm-eval refuses it itself
    assert evaluated_tasks_from_env(argv) == (None if not cli else ["wikitext_local"])


# -- 3: the Fisher cache follows the tokens ------------------------------------------------------


def test_fisher_cache_is_keyed_by_the_tokens(tiny_llama, tmp_path):
    from lm_eval_lowrank.architectures import adapter_for_model
    from lm_eval_lowrank.calibration import FisherStatsProvider

    spec = DecompositionSpec.from_args({"method": "fwsvd", "rank": 2, "layers": "1", "tensors": "q"})
    record = {"source": "arc_easy_local", "n": 4, "len": 16, "seed": 0}  # the same record: another data folder's tokens

    def sums(ids, cache_dir):
        prov = FisherStatsProvider(tiny_llama, adapter_for_model(tiny_llama), ids, spec, record=record, cache_dir=cache_dir, model_key="m")
        return prov.row_sums(tiny_llama)["model.layers.0.self_attn.q_proj"], prov.misses

    first, _ = sums(_ids(4, seed=1), tmp_path)
    other, misses = sums(_ids(4, seed=2), tmp_path)
    fresh, _ = sums(_ids(4, seed=2), None)
    assert misses == 1 and torch.equal(other, fresh) and not torch.equal(other, first)


# -- 5: lm-eval tags and groups over a scored built-in ------------------------------------------


def test_tags_and_groups_that_run_a_scored_builtin_are_refused(benchmark_data):
    from lm_eval_lowrank.calibration import check_no_leak

    for calib, tag in (("lambada_openai_local", "lambada"), ("truthfulqa_local", "truthfulqa"), ("boolq_local", "super-glue-lm-eval-v1")):
        with pytest.raises(SpecError, match=f"calib='{calib}' is invalid while evaluating '{tag}'"):
            check_no_leak(calib, [tag], benchmark_data)
    assert check_no_leak("arc_easy_local", ["ai2_arc"], benchmark_data)["unrecognised_tasks"] == []  # recognised: ARC's test split


def test_groups_and_tags_are_expanded_through_lm_eval_s_task_index(benchmark_data, tmp_path, monkeypatch):
    """A name the static map does not know is looked up in lm-eval's index (here one over a folder of YAML),
    through nested groups and tags."""
    from lm_eval.tasks import TaskManager

    import lm_eval_lowrank.calibration as cal

    (tmp_path / "suite.yaml").write_text("group: my_suite\ntask:\n  - my_tag\n  - task: lambada\n    num_fewshot: 0\n")
    (tmp_path / "member.yaml").write_text("task: boolq\ntag: my_tag\n")
    groups = cal.task_groups_of(TaskManager(include_path=str(tmp_path), include_defaults=False))
    monkeypatch.setattr(cal, "_lm_eval_task_groups", lambda: groups)
    with pytest.raises(SpecError, match="it reads boolq/validation.jsonl, which my_suite scores"):
        cal.check_no_leak("boolq_local", ["my_suite"], benchmark_data)
    with pytest.raises(SpecError, match="lambada_openai/test.jsonl"):
        cal.check_no_leak("lambada_openai_local", ["my_suite"], benchmark_data)
    assert cal.check_no_leak("arc_easy_local", ["my_suite", "not_a_task"], benchmark_data)["unrecognised_tasks"] == ["not_a_task"]


def test_a_task_pattern_is_checked_through_the_tasks_it_matches(benchmark_data, monkeypatch):
    """lm-eval expands --tasks 'wikitext*' with fnmatch: the check took the pattern for an unknown name and recorded
    status ok while wikitext_local was evaluated on the documents calibration read."""
    import lm_eval_lowrank.calibration as cal

    monkeypatch.setattr(cal, "_lm_eval_task_groups", lambda: {})  # the static names alone: no index to build
    for calib, pattern in (("wikitext_local", "wikitext*"), ("boolq_local", "bool?_local"), ("lambada_openai_local", "*_local")):
        with pytest.raises(SpecError, match=r"calib='\w+' is invalid while evaluating '\w+ \(from "):
            cal.check_no_leak(calib, [pattern], benchmark_data)
    got = cal.check_no_leak("arc_easy_local", ["wikitext*"], benchmark_data)  # matches nothing it reads
    assert got["status"] == "unchecked" and got["unrecognised_tasks"] == ["wikitext*"]  # it may match more


def test_builtins_over_the_same_documents_are_refused_and_unknown_tasks_are_not_ok(benchmark_data, monkeypatch):
    """truthfulqa_gen scores the 817 questions calib=truthfulqa_local reads, lambada_openai_mt_en lambada_openai's
    passages: both were unrecognised, and any unrecognised task still gave status ok."""
    import lm_eval_lowrank.calibration as cal

    monkeypatch.setattr(cal, "_lm_eval_task_groups", lambda: {})
    for calib, task in (("truthfulqa_local", "truthfulqa_gen"), ("lambada_openai_local", "lambada_openai_mt_en"), ("lambada_openai_local", "lambada_multilingual")):
        with pytest.raises(SpecError, match=f"calib='{calib}' is invalid while evaluating '{task}'"):
            cal.check_no_leak(calib, [task], benchmark_data)
    got = cal.check_no_leak("wikitext_local", ["arc_easy_local", "piqa"], benchmark_data)
    assert got["status"] == "unchecked" and got["unrecognised_tasks"] == ["piqa"] and "piqa" in got["reason"]
    assert cal.check_no_leak("wikitext_local", ["arc_easy_local"], benchmark_data)["status"] == "ok"


# -- 6: healing data recorded on another copy of the data or another machine ----------------------


def test_checkpoint_healing_data_is_matched_by_its_data_folder_path(benchmark_data, tmp_path):
    from lm_eval_lowrank.calibration import check_checkpoint_no_leak

    copy_dir = tmp_path / "data" / "boolq"
    copy_dir.mkdir(parents=True)
    (copy_dir / "validation.jsonl").write_bytes((benchmark_data / "boolq" / "validation.jsonl").read_bytes())

    def manifest(*paths):
        return {"decomposition": {}, "healing": [{"data": str(p)} for p in paths]}

    for healed_on in (copy_dir / "validation.jsonl", "/home/someone/shared/data/boolq/validation.jsonl", "/elsewhere/data/boolq"):
        with pytest.raises(SpecError, match="its healing step 1 read boolq/validation.jsonl, which boolq_local scores"):
            check_checkpoint_no_leak(manifest(healed_on), ["boolq_local"], where="ck")
    ok = check_checkpoint_no_leak(manifest("/home/someone/data/mmlu/dev"), ["boolq_local"])  # mapped, scored by none
    assert ok["status"] == "ok" and "mmlu/dev/anatomy.jsonl" in ok["files"]
    own = tmp_path / "notes.txt"
    own.write_text("my own text\n")
    for unknown in ("/home/someone/corpus/notes.txt", own):  # names no file of the data folder: never "ok"
        rec = check_checkpoint_no_leak(manifest(benchmark_data / "arc_easy" / "validation.jsonl", unknown), ["boolq_local"])
        assert rec["status"] == "unchecked" and str(unknown) in rec["reason"] and rec["files"] == ["arc_easy/validation.jsonl"]


def test_a_checkpoint_calibration_record_without_its_files_is_unchecked_not_ok(benchmark_data):
    """An older manifest's calibration record lists no files: it read something, so "ok" would be a guess."""
    from lm_eval_lowrank.calibration import check_checkpoint_no_leak

    rec = check_checkpoint_no_leak({"decomposition": {"calibration": {"source": "boolq_local", "n": 8}}}, ["boolq_local"])
    assert rec["status"] == "unchecked" and "calib=boolq_local" in rec["reason"] and rec["files"] == []
    listed = {"source": "arc_easy_local", "leak_check": {"calib_files": ["arc_easy/validation.jsonl"]}}
    assert check_checkpoint_no_leak({"decomposition": {"calibration": listed}}, ["boolq_local"])["status"] == "ok"


# -- 7: the fingerprint samples every weight -----------------------------------------------------


def test_model_fingerprint_follows_every_parameter(tiny_llama):
    from lm_eval_lowrank.calibration import model_fingerprint

    base = model_fingerprint(tiny_llama, "m")
    for name, _ in tiny_llama.named_parameters():
        other = copy.deepcopy(tiny_llama)
        with torch.no_grad():
            other.get_parameter(name).add_(1.0)
        assert model_fingerprint(other, "m") != base, name


# -- 8: a statistics cache hit gives the bits of computing afresh --------------------------------


def test_statistics_cache_hits_are_bit_identical_to_a_cold_run(tiny_llama, tmp_path):
    from lm_eval_lowrank.calibration import model_fingerprint
    from lm_eval_lowrank.plan import make_plan

    targets = make_plan(DecompositionSpec.from_args({"rank": 2, "layers": "2"}), tiny_llama.config).targets
    key = model_fingerprint(tiny_llama, "tiny")
    runs = []
    for _ in range(2):
        prov = _provider(tiny_llama, _ids(6), cache_dir=tmp_path, model_key=key)
        runs.append((prov.layer_stats(tiny_llama, 2, targets), prov.hits))
    (cold, cold_hits), (warm, warm_hits) = runs
    assert (cold_hits, warm_hits) == (0, 1)
    for t in targets:
        assert torch.equal(cold[t.path].input_cov, warm[t.path].input_cov) and torch.equal(cold[t.path].input_abs_mean, warm[t.path].input_abs_mean)


def test_error_corrected_factors_are_the_same_from_a_warm_statistics_cache(tiny_llama, tmp_path):
    """With calib_target the cached cross-covariances too: a warm cache gives the cold run's factors, bit for bit."""
    from lm_eval_lowrank.calibration import model_fingerprint
    from lm_eval_lowrank.decompose import decompose_model

    spec = DecompositionSpec.from_args({"method": "whiten", "rank": 4, "layers": "1|2", "calib_target": 0.25, "calib_staged": False})
    state = copy.deepcopy(tiny_llama.state_dict())
    results = []
    for _ in range(2):
        model = copy.deepcopy(tiny_llama)
        model.load_state_dict(state)
        prov = _provider(model, _ids(6), cache_dir=tmp_path, model_key=model_fingerprint(model, "tiny"), spec=spec, target=spec.calib_target)
        decompose_model(model, spec, stats_provider=prov, progress=False)
        results.append((model.state_dict(), prov.hits))
    (cold, cold_hits), (warm, warm_hits) = results
    assert cold_hits == 0 and warm_hits == 2
    assert all(torch.equal(cold[k], warm[k]) for k in cold)


# -- 9: calib_len against the model's positions ---------------------------------------------------


def test_calib_len_past_learned_positions_is_refused_before_any_forward(benchmark_data, monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    from lm_eval_lowrank.calibration import EVAL_TASKS_ENV, build_stats_provider

    monkeypatch.setenv(EVAL_TASKS_ENV, "lambada_openai_local")
    model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=2, n_positions=64)).eval()
    model.register_forward_pre_hook(lambda *_: pytest.fail("a forward ran before calib_len was checked"))
    spec = DecompositionSpec.from_args({"method": "whiten", "rank": 2, "layers": "1", "calib": "arc_easy_local", "calib_n": 2, "calib_len": 128, "cache": False})
    with pytest.raises(SpecError, match=r"^calib_len=128 is invalid for this model: it takes at most 64 positions \(n_positions=64"):
        build_stats_provider(spec, model, CharTokenizer())


def test_check_calib_len_warns_for_rope_and_skips_data_free_specs(capsys):
    from transformers import GPT2Config

    from conftest import tiny_llama_config
    from lm_eval_lowrank.calibration import check_calib_len

    whiten = DecompositionSpec.from_args({"method": "whiten", "rank": 2, "calib_len": 256})
    check_calib_len(whiten, tiny_llama_config(max_position_embeddings=128))  # RoPE: runs, extrapolated
    assert "calib_len=256 is past this model's max_position_embeddings=128" in capsys.readouterr().err
    check_calib_len(DecompositionSpec.from_args({"method": "tucker", "rank": 2, "calib_len": 256}), GPT2Config(n_positions=64))  # reads no data
    check_calib_len(whiten.with_(calib_len=64), GPT2Config(n_positions=64))
    err = capsys.readouterr().err  # only from_args' note that tucker reads no calibration data
    assert "positions" not in err and "calib_len unused: method=tucker reads no calibration data" in err
    with pytest.raises(SpecError, match="^calib_len=256 is invalid"):
        check_calib_len(DecompositionSpec.from_args({"method": "tucker", "budget": 0.5, "allocator": "sensitivity", "calib_len": 256}), GPT2Config(n_positions=64).to_dict())


# -- 10, 11a: calib= values and the errors about them ---------------------------------------------


def test_empty_calib_is_refused_not_replaced(benchmark_data, tiny_llama, monkeypatch):
    from lm_eval_lowrank.calibration import EVAL_TASKS_ENV, build_stats_provider, calibration_tokens

    monkeypatch.setenv(EVAL_TASKS_ENV, "arc_easy_local")
    spec = DecompositionSpec.from_args({"method": "whiten", "rank": 2, "calib": "", "calib_n": 2, "calib_len": 16, "cache": False})
    assert spec.calib == ""
    with pytest.raises(SpecError, match="^calib='' is invalid"):
        calibration_tokens(spec, CharTokenizer(), benchmark_data)
    with pytest.raises(SpecError, match="^calib='' is invalid"):
        build_stats_provider(spec, tiny_llama, CharTokenizer())


def test_a_short_source_error_quotes_the_arguments_as_given(benchmark_data):
    from lm_eval_lowrank.calibration import SOURCES, calibration_tokens

    chars = sum(len(t) + 2 for t in SOURCES["wikitext_local"].texts(benchmark_data))
    length = chars // 5 + 1  # wikitext_local holds at most 5 windows of it, fewer than its share (20 of 40)
    spec = DecompositionSpec.from_args({"calib": "wikitext_local+arc_easy_local", "calib_n": 40, "calib_len": length})
    with pytest.raises(SpecError, match=rf"^calib_n=40 is invalid for calib='wikitext_local\+arc_easy_local' at calib_len={length}: wikitext_local, its 20 of the 40 windows, holds only \d windows"):
        calibration_tokens(spec, CharTokenizer(), benchmark_data)


# -- 11b: the record says staged only where the solves were staged --------------------------------


def test_describe_reports_staging_only_for_methods_that_read_the_statistics(tiny_llama):
    from lm_eval_lowrank.plan import make_plan

    targets = make_plan(DecompositionSpec.from_args({"rank": 2, "layers": "1"}), tiny_llama.config).targets
    for args, staged in (
        ({"method": "tucker", "budget": 0.5, "allocator": "sensitivity"}, False),  # the allocator's dense pass only
        ({"method": "whiten", "rank": 2}, True),
    ):
        prov = _provider(tiny_llama, _ids(4), spec=DecompositionSpec.from_args(args))
        prov.layer_stats(tiny_llama, 1, targets)
        d = prov.describe()
        assert (d["staged"], d["stage_order"]) == ((True, "adapter") if staged else (False, None)), args


def test_a_decomposition_cache_hit_records_this_runs_leak_check_and_calibration(tiny_llama_dir, tmp_path, monkeypatch):
    """On a decomposition-cache hit the JSON's calibration block was the stored run's: its no-leak check said "ok"
    for the tasks evaluated then, not for the ones evaluated now, and its statistics-cache counts were that run's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lm_eval_lowrank.api import compress_model

    monkeypatch.setenv("LM_EVAL_LOWRANK_CACHE", str(tmp_path / "cache"))
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)

    def run(tasks):
        monkeypatch.setenv("LM_EVAL_LOWRANK_EVAL_TASKS", tasks)
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
        spec = {"method": "whiten", "rank": 2, "layers": "1", "calib_n": 2, "calib_len": 32}
        return compress_model(model, spec, tokenizer=tokenizer, model_id=str(tiny_llama_dir), progress=False)

    first, second = run("arc_easy_local"), run("my_custom_task")
    assert not first.cache["hit"] and second.cache["hit"]
    assert first.calibration["leak_check"]["status"] == "ok" and first.calibration["layers_computed"]
    leak = second.calibration["leak_check"]
    assert leak["status"] == "unchecked" and "my_custom_task" in json.dumps(leak)
    assert second.calibration["layers_computed"] == [] and second.calibration["cache"]["misses"] == 0


def test_calibration_windows_are_checked_from_the_tokenizer_and_sampled_once(monkeypatch, benchmark_data):
    """The check before the weights load samples the windows; the calibration after it takes them (once) instead of
    tokenising the source again. A named tokenizer only: a nameless one is never taken for another."""
    from lm_eval_lowrank import calibration as C

    class NamedCharTokenizer(CharTokenizer):
        name_or_path = "chars"

        def __len__(self) -> int:
            return 128

    monkeypatch.setenv("LM_EVAL_LOWRANK_DATA", str(benchmark_data))
    calls = []
    sample = C._sample_calibration_tokens
    monkeypatch.setattr(C, "_sample_calibration_tokens", lambda *a: (calls.append(1), sample(*a))[1])
    spec = DecompositionSpec.from_args({"method": "whiten", "rank": 2, "calib_n": 4, "calib_len": 32})
    with pytest.raises(SpecError, match=r"^calib_n=100000 is invalid for calib='wikitext_local' at calib_len=32"):
        C.check_calibration_windows(spec.with_(calib_n=100000), NamedCharTokenizer())
    C.check_calibration_windows(spec, NamedCharTokenizer())
    ids, record = C.calibration_tokens(spec, NamedCharTokenizer())
    assert len(calls) == 2 and ids.shape == (4, 32) and record["n"] == 4
    again, _ = C.calibration_tokens(spec, NamedCharTokenizer())  # taken once: sampled anew, the same windows
    assert len(calls) == 3 and torch.equal(again, ids)
    C.check_calibration_windows(spec, CharTokenizer())  # nameless: nothing kept
    C.calibration_tokens(spec, CharTokenizer())
    assert len(calls) == 5


def test_a_calib_len_longer_than_the_source_blames_calib_len_and_warns_once(benchmark_data, tiny_llama, capsys):
    """calib_len past every token of the source said 'calib_n=128 is invalid ... holds only 0 windows' (calib_n was
    never given), and the extrapolation warning came twice (before the load and before the first forward)."""
    from lm_eval_lowrank.calibration import SOURCES, calibration_tokens, check_calib_len

    chars = sum(len(t) + 2 for t in SOURCES["wikitext_local"].texts(benchmark_data))
    spec = DecompositionSpec.from_args({"method": "whiten", "rank": 2, "calib_len": chars + 1})
    with pytest.raises(SpecError, match=rf"^calib_len={chars + 1} is invalid for calib='wikitext_local': the source holds \d+ tokens, not one window"):
        calibration_tokens(spec, CharTokenizer(), benchmark_data)
    capsys.readouterr()
    long = DecompositionSpec.from_args({"method": "whiten", "rank": 2, "calib_len": 10**6 + 7})
    check_calib_len(long, tiny_llama.config)
    check_calib_len(long, tiny_llama.config)
    assert capsys.readouterr().err.count("calib_len=1000007 is past this model's") == 1
