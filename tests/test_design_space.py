"""Design space: size formula, Table 4 reproduction, param/FLOP calculator, generators, CLI."""

from __future__ import annotations

import itertools
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from lm_eval_lowrank import design_space as ds
from lm_eval_lowrank.architectures import adapter_for_config
from lm_eval_lowrank.cli import cli
from lm_eval_lowrank.spec import SpecError


# -- size formula ------------------------------------------------------------------------
def _brute_force_size(nt: int, nl: int, rank: int) -> int:
    """Count (tensor subset, layer subset, rank) choices directly, plus the dense model."""
    tensor_subsets = [s for k in range(1, nt + 1) for s in itertools.combinations(range(nt), k)]
    layer_subsets = [s for k in range(1, nl + 1) for s in itertools.combinations(range(nl), k)]
    return sum(1 for _ in itertools.product(tensor_subsets, layer_subsets, range(rank))) + 1


@pytest.mark.parametrize("nt,nl,rank", [(1, 1, 1), (2, 3, 1), (3, 2, 4), (4, 4, 3), (2, 5, 2)])
def test_size_formula_matches_enumeration(nt: int, nl: int, rank: int) -> None:
    assert ds.design_space_size(nt, nl, rank) == _brute_force_size(nt, nl, rank)


def test_size_is_exact_for_huge_spaces() -> None:
    s = ds.design_space_size(7, 80, 8192)  # Llama-2-70B: far past 2**64
    assert s == (2**7 - 1) * (2**80 - 1) * 8192 + 1
    assert ds.log2_design_space_size(7, 80, 8192) == pytest.approx(math.log2(127) + 80 + 13, abs=1e-9)


@pytest.mark.parametrize(
    "model,nt,nl,log2_size",
    [
        # rank axis = hidden size: O(2^51) Llama-2-7B, O(2^28) BERT-base, O(2^40) BERT-large
        ("llama-2-7b", 7, 32, 51),
        ("llama-2-13b", 7, 40, 59),
        ("llama-2-70b", 7, 80, 100),
        ("bert-base", 6, 12, 28),
        ("bert-large", 6, 24, 40),
    ],
)
def test_table2_orders_of_magnitude(model: str, nt: int, nl: int, log2_size: int) -> None:
    r = ds.calculate(ds.load_config(model))
    assert (len(r.tensors), r.num_layers) == (nt, nl)
    assert round(r.log2_design_space_size) == log2_size
    assert r.design_space_size == ds.design_space_size(nt, nl, r.hidden_size)


def test_abstract_headline_is_the_layer_tensor_part() -> None:
    # The paper's abstract quotes O(2^39) for Llama-2-7B: (2^7-1)(2^32-1) with a single rank choice.
    assert round(ds.log2_design_space_size(7, 32, 1)) == 39


@pytest.mark.parametrize("bad", [(0, 3, 1), (3, 0, 1), (3, 3, 0), (True, 3, 1)])
def test_size_rejects_bad_axes(bad: tuple) -> None:
    with pytest.raises(SpecError):
        ds.design_space_size(*bad)


# -- built-in configs and param counts -------------------------------------------------------
@pytest.mark.parametrize(
    "model,expected",
    [
        ("llama-2-7b", 6_738_415_616),
        ("llama-2-13b", 13_015_864_320),
        ("llama-2-70b", 68_976_648_192),
        ("smollm2-135m", 134_515_008),
        ("gpt2", 124_439_808),
    ],
)
def test_param_counts_exact(model: str, expected: int) -> None:
    cfg = ds.load_config(model)
    assert adapter_for_config(cfg).param_count(cfg) == expected
    assert ds.calculate(cfg).params_total == expected


@pytest.mark.parametrize("model,approx", [("bert-base", 109.5e6), ("bert-large", 335e6)])
def test_bert_param_counts(model: str, approx: float) -> None:
    cfg = ds.load_config(model)
    assert adapter_for_config(cfg).param_count(cfg) == pytest.approx(approx, rel=0.002)


def test_load_config_aliases_paths_and_folders(tmp_path: Path) -> None:
    assert ds.load_config("Llama-2-7B")["hidden_size"] == 4096
    assert ds.load_config("meta-llama/Llama-2-7b-hf")["num_hidden_layers"] == 32
    cfg = {k: v for k, v in ds.BUILTIN_CONFIGS["smollm2-135m"].items()}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    from_file = ds.load_config(str(tmp_path / "config.json"))
    from_dir = ds.load_config(str(tmp_path))
    assert from_file["vocab_size"] == from_dir["vocab_size"] == 49152
    assert ds.calculate(from_dir).params_total == 134_515_008


def test_load_config_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as e:
        ds.load_config("llama-9b")
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in ds.builtin_names())
    with pytest.raises(SpecError, match="no config.json"):
        ds.load_config(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(SpecError, match="JSON"):
        ds.load_config(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "not_a_model"}))
    with pytest.raises(SpecError, match="transformers cannot build a causal LM from this config"):
        ds.calculate(ds.load_config(str(tmp_path)))


# -- Table 4 ------------------------------------------------------------------------------------
@pytest.mark.parametrize("layers,percent", ds.TABLE4_LLAMA2_7B)
@pytest.mark.parametrize("layout", ["tucker", "folded"])
def test_table4_reductions(layers: tuple[int, ...], percent: int, layout: str) -> None:
    spec = {"rank": 1, "layers": "|".join(map(str, layers)), "tensors": "all", "layout": layout}
    r = ds.calculate(ds.load_config("llama-2-7b"), spec)
    assert round(100 * r.param_reduction) == percent
    assert r.decomposed_modules == 7 * len(layers) and r.layout == layout


def test_table4_sets_at_32_layers_are_the_papers() -> None:
    assert list(ds.table4_layer_sets(32).values()) == [layers for layers, _ in ds.TABLE4_LLAMA2_7B]
    assert ds.table4_layer_sets(32)["stride-3"] == (3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 32)


@pytest.mark.parametrize("n", [1, 2, 4, 12, 24, 30, 40, 80])
def test_table4_sets_scale_to_any_depth(n: int) -> None:
    sets = ds.table4_layer_sets(n)
    for layers in sets.values():
        assert layers and list(layers) == sorted(set(layers)) and 1 <= layers[0] and layers[-1] <= n
    if n >= 12:
        assert len(sets) == 6
        # strides are kept in layers: each set's share of the depth stays about the same
        assert len(sets["odd"]) == n // 2
        assert len(sets["stride-3"]) in (n // 3, n // 3 + 1)


# -- FLOPs --------------------------------------------------------------------------------------
def test_flops_before_is_twice_the_matmul_params_plus_attention() -> None:
    cfg = ds.load_config("llama-2-7b")
    adapter = adapter_for_config(cfg)
    linears = 32 * sum(o * i for o, i in adapter.tensor_shapes(cfg).values())
    head = 32000 * 4096
    r0 = ds.calculate(cfg, seq_len=0)
    assert r0.attention_flops == 0
    assert r0.flops_before == 2 * (linears + head)
    r = ds.calculate(cfg, seq_len=1024)
    assert r.attention_flops == 4 * 32 * 1024 * 4096  # scores + context, 2 FLOPs per MAC
    assert r.flops_before == r0.flops_before + r.attention_flops
    # embeddings are lookups: FLOPs/token ~ 2 x params minus the input embedding
    assert r0.flops_before == 2 * (r0.params_total - head - 65 * 4096)


def test_flops_after_drop_by_twice_the_params_removed() -> None:
    cfg = ds.load_config("smollm2-135m")
    r = ds.calculate(cfg, {"rank": 8, "layers": "3-28", "tensors": "all"}, seq_len=256)
    assert r.flops_before - r.flops_after == 2 * r.params_removed > 0
    assert 0 < r.flop_reduction < 1 and r.params_after == r.params_total - r.params_removed
    # GQA: attention width is heads x head_dim (9 x 64), not the kv width
    assert r.attention_flops == 4 * 30 * 256 * 9 * 64


def test_tucker_layout_counts_the_core() -> None:
    cfg = ds.load_config("llama-2-7b")
    args = {"rank": 16, "layers": "3", "tensors": "q"}
    folded = ds.calculate(cfg, {**args, "layout": "folded"}, per_module=True)
    tucker = ds.calculate(cfg, {**args, "layout": "tucker"}, per_module=True)
    assert folded.modules[0]["params_after"] == 16 * (4096 + 4096)
    assert tucker.modules[0]["params_after"] == 16 * (4096 + 4096) + 16 * 16
    assert ds.calculate(cfg, args).layout == "folded"  # auto resolves like hf-tucker


def test_dense_spec_and_unhelpful_ranks() -> None:
    cfg = ds.load_config("smollm2-135m")
    dense = ds.calculate(cfg)
    assert dense.params_removed == 0 and dense.flops_after == dense.flops_before
    # rank 300 on 576x576 saves nothing (break-even 288): counted as kept dense, not decomposed
    r = ds.calculate(cfg, {"rank": 300, "layers": "3", "tensors": "q|gate"})
    assert r.kept_dense == 1 and r.decomposed_modules == 1


@pytest.mark.parametrize(
    "args,match",
    [
        ({"rank": 1, "layers": "33"}, "layer 33 is past the end"),
        ({"rank": 0}, "rank"),
        ({"rank": 1, "tensors": "qkv"}, "unknown tensor"),
        ({"rank": 5000, "layers": "3"}, "valid 1..4096"),
    ],
)
def test_calculator_rejects_bad_specs(args: dict, match: str) -> None:
    with pytest.raises(SpecError, match=match):
        ds.calculate(ds.load_config("llama-2-7b"), args)


def test_calculator_refuses_a_budget_and_names_rank_choices() -> None:
    """A budget's ranks come from allocating it over the weights: costed from the config alone its plan is empty, which
    read as a 0 % reduction. And a bad rank axis is named as such, not as rank=."""
    cfg = ds.load_config("smollm2-135m")
    with pytest.raises(SpecError, match=r"^budget=0.5 is invalid here: the calculator needs explicit ranks \(rank=N"):
        ds.calculate(cfg, {"budget": "0.5", "layers": "3|18", "tensors": "all"})
    for bad in (0, -3, True, 2.5):
        with pytest.raises(SpecError, match=rf"^rank_choices={bad!r} is invalid: expected an int >= 1"):
            ds.calculate(cfg, {"rank": "1"}, rank_choices=bad)
    assert ds.calculate(cfg, {"rank": "1"}, rank_choices=7).rank_choices == 7


# -- generators ----------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [12, 24, 30, 32, 40, 80])
def test_spread_sets_follow_the_pruning_rules(n: int) -> None:
    for k in range(1, n - 2):
        layers = ds.spread_layer_sets(n, k)
        assert len(layers) == k == len(set(layers))
        assert min(layers) >= 3 and max(layers) <= n - 1  # not the first two, not the last
        if k >= 2:
            gaps = [b - a for a, b in zip(layers, layers[1:])]
            assert layers[0] == 3 and layers[-1] == n - 1
            assert max(gaps) - min(gaps) <= 1  # as even as integers allow
    assert ds.spread_layer_sets(32, 5) == (3, 10, 17, 24, 31)


def test_spread_sets_bounds() -> None:
    assert ds.spread_layer_sets(32, 2, avoid_first=0, avoid_last=0) == (1, 32)
    assert ds.spread_layer_sets(32, 1) == (17,)
    with pytest.raises(SpecError):
        ds.spread_layer_sets(32, 30)  # only 29 layers allowed
    with pytest.raises(SpecError):
        ds.spread_layer_sets(32, 0)


def test_single_layers_and_tensor_groups() -> None:
    assert ds.single_layers(3) == [(1,), (2,), (3,)]
    llama = ds.tensor_groups(adapter_for_config(ds.load_config("llama-2-7b")))
    assert llama["attn"] == ("q", "k", "v", "o") and llama["mlp"] == ("gate", "up", "down")
    assert llama["all"] == ("q", "k", "v", "o", "gate", "up", "down") and llama["q"] == ("q",)
    assert len(llama) == 7 + 3
    gpt2 = ds.tensor_groups(adapter_for_config(ds.load_config("gpt2")))
    assert gpt2["attn"] == ("qkv", "o") and gpt2["mlp"] == ("up", "down")
    bert = ds.tensor_groups(adapter_for_config(ds.load_config("bert-base")))
    assert bert["attn"] == ("q", "k", "v", "o") and bert["mlp"] == ("up", "down")



# Tiny configs (as config.json dicts) of every architecture an adapter knows and of the generic ones people sweep,
# each with its attention projections, its MLP/expert projections and the tensors that are neither.
_TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
_QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")
_LLAMA = (("q", "k", "v", "o"), ("gate", "up", "down"), ())
_NEOX = (("query_key_value", "dense"), ("dense_h_to_4h", "dense_4h_to_h"), ())
_EXPERTS = ("experts.gate_up_proj", "experts.down_proj")
_GROUP_CASES: dict[str, tuple[dict, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]]] = {
    **{mt: (dict(_TINY, model_type=mt, head_dim=8), _LLAMA) for mt in ("llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2", "granite", "smollm3", "gemma", "gemma2", "gemma3_text")},
    "gemma3": ({"model_type": "gemma3", "text_config": dict(_TINY, model_type="gemma3_text", head_dim=8), "vision_config": {"hidden_size": 16}}, _LLAMA),
    "gpt2": (dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=64), (("qkv", "o"), ("up", "down"), ())),
    "bert": (dict(_TINY, model_type="bert"), (("q", "k", "v", "o"), ("up", "down"), ())),
    # generic: read off an empty model; GPT-NeoX, Bloom and Falcon keep attention under attention./self_attention.
    "gpt_neox": (dict(_TINY, model_type="gpt_neox"), _NEOX),
    "bloom": (dict(model_type="bloom", hidden_size=32, n_layer=2, n_head=4, vocab_size=64), _NEOX),
    "falcon": (dict(_TINY, model_type="falcon"), _NEOX),
    "gptj": (dict(model_type="gptj", n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=64, rotary_dim=4), (("k_proj", "v_proj", "q_proj", "out_proj"), ("fc_in", "fc_out"), ())),
    "opt": (dict(_TINY, model_type="opt", ffn_dim=48, word_embed_proj_dim=32), (("k_proj", "v_proj", "q_proj", "out_proj"), ("fc1", "fc2"), ())),  # fc1/fc2 sit in the layer itself
    "phi": (dict(_TINY, model_type="phi"), (("q_proj", "k_proj", "v_proj", "dense"), ("fc1", "fc2"), ())),
    "phi3": (dict(_TINY, model_type="phi3", pad_token_id=0), (("o_proj", "qkv_proj"), ("gate_up_proj", "down_proj"), ())),
    "mixtral": (dict(_TINY, model_type="mixtral", num_local_experts=4), (_QKVO, _EXPERTS, ())),
    "olmoe": (dict(_TINY, model_type="olmoe", num_experts=4), (_QKVO, _EXPERTS, ())),
    "qwen2_moe": (
        dict(_TINY, model_type="qwen2_moe", moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=4),
        (_QKVO, (*_EXPERTS, "gate_proj", "up_proj", "down_proj", "shared_expert_gate"), ()),
    ),
    "deepseek_v3": (
        dict(_TINY, model_type="deepseek_v3", moe_intermediate_size=24, n_routed_experts=4, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16,
             qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_group=1, topk_group=1),
        (
            ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"),
            ("gate_proj", "up_proj", "down_proj", *_EXPERTS, "mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj", "mlp.shared_experts.down_proj"),
            (),
        ),
    ),
    # a hybrid: the Mamba mixer's projections are neither attention nor MLP
    "jamba": (
        dict(_TINY, model_type="jamba", num_experts=1, attn_layer_period=2, attn_layer_offset=1, mamba_d_state=4, mamba_expand=2, mamba_dt_rank=4),
        (_QKVO, ("gate_proj", "up_proj", "down_proj"), ("in_proj", "x_proj", "dt_proj", "out_proj")),
    ),
}


@pytest.mark.parametrize("model_type", sorted(_GROUP_CASES))
def test_attn_and_mlp_groups_hold_exactly_their_projections(model_type: str) -> None:
    from lm_eval_lowrank.architectures import known_architectures

    assert set(known_architectures()) <= set(_GROUP_CASES)  # a new adapter needs its case here
    config, (attn, mlp, neither) = _GROUP_CASES[model_type]
    adapter = ds.config_adapter(config)
    groups = ds.tensor_groups(adapter)
    # compared as sets (the group keeps the adapter's order); the three parts cover every tensor once
    assert set(groups["attn"]) == set(attn) and len(groups["attn"]) == len(attn)
    assert set(groups["mlp"]) == set(mlp) and len(groups["mlp"]) == len(mlp)
    assert sorted(groups["all"]) == sorted((*attn, *mlp, *neither))


def test_sweep_mlp_group_on_gpt_neox_leaves_attention_dense() -> None:
    """The reported bug: ``--tensor-groups mlp`` on Pythia decomposed attention too, and ``attn`` was unknown."""
    from lm_eval_lowrank.sweep import expand_tensor_groups

    config = _GROUP_CASES["gpt_neox"][0]
    adapter = ds.config_adapter(config)
    assert expand_tensor_groups("attn,mlp", adapter) == [("attn", ("query_key_value", "dense")), ("mlp", ("dense_h_to_4h", "dense_4h_to_h"))]
    r = ds.calculate(config, {"rank": 2, "tensors": "|".join(ds.tensor_groups(adapter)["mlp"])}, per_module=True)
    assert {m["path"].split(".")[-2] for m in r.modules} == {"mlp"} and r.decomposed_modules == 2 * 2

def test_generated_candidates_are_valid_specs() -> None:
    cfg = ds.load_config("smollm2-135m")
    groups = ds.tensor_groups(adapter_for_config(cfg))
    for layers in [*ds.table4_layer_sets(30).values(), ds.spread_layer_sets(30, 4), *ds.single_layers(30)[:3]]:
        for tensors in groups.values():
            r = ds.calculate(cfg, {"rank": 4, "layers": "|".join(map(str, layers)), "tensors": "|".join(tensors)})
            assert r.decomposed_modules == len(layers) * len(tensors)


# -- CLI -----------------------------------------------------------------------------------------
def _run(*args: str):
    return CliRunner().invoke(cli, ["space", *args])


def test_cli_json() -> None:
    res = _run("--model", "llama-2-7b", "--rank", "1", "--layers", "3|30", "--tensors", "all", "--layout", "tucker", "--json")
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    for key in ("params_total", "params_after", "param_reduction", "design_space_size", "log2_design_space_size", "layout"):
        assert key in d
    assert d["params_total"] == 6_738_415_616 and round(100 * d["param_reduction"]) == 6
    assert d["layout"] == "tucker" and d["design_space_size"] == ds.design_space_size(7, 32, 4096)
    assert "modules" not in d


def test_cli_table_default_model_and_per_module() -> None:
    res = _run("--rank", "8", "--layers", "3-30:3", "--tensors", "q|k", "--per-module", "--seq-len", "0")
    assert res.exit_code == 0, res.output
    assert "smollm2-135m" in res.output and "layout" in res.output and "folded" in res.output
    assert "model.layers.2.self_attn.q_proj" in res.output
    lines = res.output.splitlines()
    head = lines[: lines.index("")]
    # aligned: every value starts in the same column, after the widest label
    starts = {re.match(r"^(.+?)\s{2,}(\S.*)$", line).start(2) for line in head}
    assert len(starts) == 1 and len(head) >= 10


def test_cli_table4() -> None:
    res = _run("--model", "llama-2-7b", "--table4", "--layout", "tucker", "--json")
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert [round(100 * r["param_reduction"]) for r in rows] == [p for _, p in ds.TABLE4_LLAMA2_7B]
    assert _run("--table4", "--layers", "3").exit_code == 2


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--model", "nope"], "built-in names"),
        (["--model", "llama-2-7b", "--rank", "1", "--layers", "33"], "layer 33"),
        (["--rank", "0"], "rank"),
        (["--rank", "1", "--layout", "diagonal"], "layout"),
        (["--seq-len", "-3"], "--seq-len"),
        (["--rank-choices", "x"], "--rank-choices"),
    ],
)
def test_cli_bad_input_one_line_exit_2(args: list[str], needle: str) -> None:
    res = _run(*args)
    assert res.exit_code == 2, res.output
    out = res.output.strip()
    assert out.startswith("Error:") and "\n" not in out and needle in out


def _console_script() -> str:
    exe = Path(sys.executable).with_name("lm-eval-lowrank")
    return str(exe) if exe.exists() else (shutil.which("lm-eval-lowrank") or "")


def test_console_script_json_and_error() -> None:
    exe = _console_script()
    if not exe:
        pytest.skip("lm-eval-lowrank console script not installed")
    ok = subprocess.run(
        [exe, "space", "--model", "llama-2-7b", "--rank", "1", "--layers", "3|18|32", "--tensors", "all", "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    d = json.loads(ok.stdout)
    assert round(100 * d["param_reduction"]) == 9 and d["layout"] == "folded"
    bad = subprocess.run([exe, "space", "--model", "llama-2-7b", "--rank", "1", "--layers", "33"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stdout == ""
    assert len(bad.stderr.strip().splitlines()) == 1 and "layer 33" in bad.stderr


def test_space_does_not_import_torch() -> None:
    code = "import sys; from lm_eval_lowrank.cli import cli; cli(['space', '--json'], standalone_mode=False); assert 'torch' not in sys.modules"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_a_hub_id_reads_config_json_from_the_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The tests run offline (HF_HUB_OFFLINE=1): a Hub id resolves through the local Hub cache, as it would for a
    # user who has downloaded the model; online, hf_hub_download fetches config.json alone.
    import huggingface_hub.constants

    from lm_eval_lowrank.sweep import model_info

    commit = "0" * 40
    repo = tmp_path / "models--someorg--tiny-neox"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    config = {"model_type": "gpt_neox", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 5, "num_attention_heads": 4, "vocab_size": 120}
    (repo / "snapshots" / commit / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))

    loaded = ds.load_config("someorg/tiny-neox")
    assert loaded == {"_name": "tiny-neox", **config}
    num_layers, tensors, _ = model_info("someorg/tiny-neox")  # what sweep and search start from
    assert num_layers == 5 and tensors == ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
    with pytest.raises(SpecError, match=r"^model='someorg/absent' is invalid: .* could not be read from the Hugging Face Hub \(") as e:
        ds.load_config("someorg/absent")
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("field, value", [("num_hidden_layers", "x"), ("num_hidden_layers", 0), ("num_hidden_layers", -1), ("num_hidden_layers", 2.5), ("vocab_size", -5), ("hidden_size", True)])
def test_space_refuses_a_config_whose_sizes_are_not_counts(tmp_path, field, value) -> None:
    """A string layer count was int()'s traceback, 0 layers a garbled 'is in layers  only', and 2.5 layers or a
    negative vocabulary were costed without a word."""
    cfg = dict(json.loads(json.dumps(ds.load_config("smollm2-135m"))), **{field: value})
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    res = _run("--model", str(path), "--rank", "1")
    assert res.exit_code == 2, res.output
    assert res.output.strip().splitlines() == [f"Error: the config's {field}={value!r} is invalid: expected an int >= 1"]
    cfg[field] = float(ds.load_config("smollm2-135m")[field])  # 30.0: an integral float is the count
    path.write_text(json.dumps(cfg))
    assert _run("--model", str(path), "--rank", "1").exit_code == 0
