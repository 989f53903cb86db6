"""What the generic adapter offers (routers, linears with a forward of their own, peft wrappers), and the refusals
decompose_model makes before it replaces anything: a target already decomposed, a weight with inf/nan."""

from __future__ import annotations

import copy
import warnings
from types import SimpleNamespace

import pytest
import torch
import transformers
from conftest import tiny_llama_config
from torch import nn

from lm_eval_lowrank.api import compress_model
from lm_eval_lowrank.architectures import GenericAdapter, adapter_for_model, config_side_adapter
from lm_eval_lowrank.decompose import decompose_model
from lm_eval_lowrank.methods import LayerStats
from lm_eval_lowrank.modules import LowRankExpertWeights, LowRankLinear
from lm_eval_lowrank.plan import make_plan
from lm_eval_lowrank.spec import DecompositionSpec, SpecError

_SMALL = dict(vocab_size=128, max_position_embeddings=128)


def _built(config):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_config(config).eval()


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(model, before) -> bool:
    def same(a, b):  # NaN counts as equal to NaN
        return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())

    after = model.state_dict()
    return after.keys() == before.keys() and all(same(after[k], v) for k, v in before.items())


# -- routers and linears with a forward of their own are never offered -------------------------------------------
def test_llama4_router_is_not_offered_and_the_decomposed_model_runs():
    """Llama4Router is an nn.Linear returning (scores, logits): as a LowRankLinear the first forward failed."""
    config = transformers.Llama4TextConfig(
        hidden_size=64, intermediate_size=96, intermediate_size_mlp=160, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, num_local_experts=16, num_experts_per_tok=1, interleave_moe_layer_step=1, no_rope_layers=[1, 1], **_SMALL,
    )  # fmt: skip
    model = _built(config)
    before_load = config_side_adapter(config)
    assert "router" not in before_load.tensor_paths
    assert before_load.tensor_paths == adapter_for_model(model).tensor_paths  # the same names before and after load
    report = decompose_model(model, DecompositionSpec.from_args({"rank": 8}), progress=False)
    assert not any("router" in path for path in report.plan.module_names())
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 128, (1, 8))).logits).all()


def test_jetmoe_routers_are_not_offered():
    config = transformers.JetMoeConfig(
        hidden_size=64, num_hidden_layers=2, num_key_value_heads=2, kv_channels=16, intermediate_size=96, num_local_experts=8, num_experts_per_tok=2, **_SMALL
    )
    model = _built(config)
    before_load = config_side_adapter(config)
    assert list(before_load.tensor_paths.values()) == ["self_attention.kv_proj"]  # not mlp.router.layer nor the MoA's
    assert adapter_for_model(model).tensor_paths == before_load.tensor_paths


class _Scores(nn.Linear):
    """A linear whose forward returns more than x W^T + b (as routers do)."""

    def forward(self, x):
        logits = super().forward(x)
        return logits.softmax(-1), logits


def test_a_gate_of_the_configs_experts_and_a_linear_with_its_own_forward_are_not_offered():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(8, 8)
            self.gate = nn.Linear(8, 4, bias=False)  # transformers 4's Mixtral: scores the config's 4 experts
            self.gate_proj = nn.Linear(8, 4)  # a projection that happens to be as wide
            self.scores = _Scores(8, 8)

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = SimpleNamespace(num_hidden_layers=2, num_local_experts=4)
            self.layers = nn.ModuleList([Block(), Block()])

    assert list(GenericAdapter.from_model(Toy()).tensor_paths) == ["q_proj", "gate_proj"]


def test_falcon_linears_are_still_offered():
    """FalconLinear has a forward of its own that computes x W^T + b: its projections stay offered."""
    config = transformers.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, new_decoder_architecture=False, **_SMALL)
    model = _built(config)
    assert list(config_side_adapter(config).tensor_paths) == ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]
    decompose_model(model, DecompositionSpec.from_args({"rank": 4, "layers": "1", "tensors": "dense_h_to_4h"}), progress=False)
    assert isinstance(model.transformer.h[0].mlp.dense_h_to_4h, LowRankLinear)


# -- peft wrappers on architectures without an adapter of their own ---------------------------------------------
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # peft reading a renamed transformers attribute
@pytest.mark.parametrize(
    "config,lora_targets,tensors",
    [
        (transformers.Phi3Config(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4, pad_token_id=0, **_SMALL), ["qkv_proj"], "qkv_proj|o_proj"),
        (transformers.OPTConfig(hidden_size=64, ffn_dim=160, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64, pad_token_id=1, **_SMALL), ["q_proj", "v_proj"], "q_proj|k_proj|v_proj"),
    ],
    ids=["phi3", "opt"],
)
def test_a_peft_wrapper_is_offered_as_the_linear_it_wraps(config, lora_targets, tensors):
    """The wrapper's name with its base layer's shape, as before load; the LoRA matrices are never offered, and the
    base layer is what becomes the factors, the adapter adding its own term."""
    from peft import LoraConfig, get_peft_model

    base = _built(config)
    plain = copy.deepcopy(base)
    adapted = get_peft_model(copy.deepcopy(base), LoraConfig(r=16, target_modules=lora_targets, init_lora_weights=False)).eval()
    before_load, loaded = config_side_adapter(config), adapter_for_model(adapted.get_base_model())
    assert (loaded.tensor_paths, loaded.tensor_shapes(None)) == (before_load.tensor_paths, before_load.tensor_shapes(None))
    spec = {"rank": 4, "tensors": tensors}
    compress_model(plain, spec, progress=False)
    report = compress_model(adapted, spec, progress=False)
    assert report.plan.module_names() == make_plan(DecompositionSpec.from_args(spec), config, adapter=before_load).module_names()
    layers = adapted.get_base_model().model.layers if hasattr(adapted.get_base_model().model, "layers") else adapted.get_base_model().model.decoder.layers
    plain_layers = plain.model.layers if hasattr(plain.model, "layers") else plain.model.decoder.layers
    h = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for name in lora_targets:
            wrapped = getattr(layers[0].self_attn, name)
            assert isinstance(wrapped.base_layer, LowRankLinear)
            lora = wrapped.lora_B["default"](wrapped.lora_A["default"](h)) * wrapped.scaling["default"]
            torch.testing.assert_close(wrapped(h), getattr(plain_layers[0].self_attn, name)(h) + lora, rtol=1e-5, atol=1e-5)
    everything = compress_model(get_peft_model(copy.deepcopy(base), LoraConfig(r=16, target_modules=lora_targets)).eval(), {"rank": 4}, progress=False)
    assert not any("lora_" in path or "base_layer" in path for path in everything.plan.module_names())


# -- a target already decomposed is refused by name, before anything changes --------------------------------------
class _IdentityStats:
    def layer_stats(self, model, layer, targets):
        return {t.path: LayerStats(torch.eye(t.in_features), 1000) for t in targets}


def test_decomposing_a_decomposed_module_again_is_refused_and_changes_nothing():
    """Staged calibration replaced layers 1 and 2 before it reached the decomposed layer 3 (a TypeError)."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama_config()).eval()
    decompose_model(model, DecompositionSpec.from_args({"rank": 4, "layers": "3"}), progress=False)
    before = _state(model)
    for spec, stats in (({"rank": 2, "method": "whiten"}, _IdentityStats()), ({"rank": 2}, None)):
        with pytest.raises(SpecError, match=r"^model\.layers\.2\.self_attn\.q_proj is already decomposed \(rank 4\): .*leave layer 3's 'q' out of layers=/tensors="):
            decompose_model(model, DecompositionSpec.from_args(spec), stats_provider=stats, progress=False)
        assert _same_state(model, before)
    assert sum(isinstance(m, LowRankLinear) for m in model.modules()) == 7


@pytest.mark.parametrize("spec", [{"rank": 2}, {"budget": 0.9, "layers": "2|3"}], ids=["cached-rank", "budget"])
def test_compress_model_refuses_a_decomposed_module_before_the_cache_or_the_allocator_reads_it(spec, tmp_path, monkeypatch):
    """compress_model with the cache on hashed the decomposed module as dense (a TypeError from the cache key),
    and a budget's allocator did the same, before decompose_model's own check ran."""
    monkeypatch.setenv("LM_EVAL_LOWRANK_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama_config()).eval()
    model.save_pretrained(tmp_path / "m")
    compress_model(model, {"rank": 4, "layers": "3", "cache": False}, progress=False)
    before = _state(model)
    with pytest.raises(SpecError, match=r"^model\.layers\.2\.self_attn\.q_proj is already decomposed \(rank 4\)"):
        compress_model(model, spec, model_id=str(tmp_path / "m"), progress=False)
    assert _same_state(model, before)


def test_the_generic_adapter_refuses_a_decomposed_linear_instead_of_skipping_it():
    config = transformers.OPTConfig(hidden_size=64, ffn_dim=96, num_hidden_layers=3, num_attention_heads=4, word_embed_proj_dim=64, **_SMALL)
    model = _built(config)
    decompose_model(model, DecompositionSpec.from_args({"rank": 4, "layers": "2", "tensors": "fc1"}), progress=False)
    assert adapter_for_model(model).tensor_paths == config_side_adapter(config).tensor_paths
    before = _state(model)
    with pytest.raises(SpecError, match=r"^model\.decoder\.layers\.1\.fc1 is already decomposed \(rank 4\)"):
        decompose_model(model, DecompositionSpec.from_args({"rank": 2, "tensors": "fc1"}), progress=False)
    assert _same_state(model, before)


def test_decomposed_stacked_experts_are_refused_not_decomposed_again():
    config = transformers.MixtralConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, **_SMALL)
    model = _built(config)
    spec = DecompositionSpec.from_args({"rank": 2, "layers": "1", "tensors": "experts.down_proj"})
    decompose_model(model, spec, progress=False)
    assert isinstance(model.model.layers[0].mlp.experts.down_proj, LowRankExpertWeights)
    before = _state(model)
    with pytest.raises(SpecError, match=r"^model\.layers\.0\.mlp\.experts\.down_proj is already decomposed \(rank 2\)"):
        decompose_model(model, spec, progress=False)
    assert _same_state(model, before)


# -- non-finite weights -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("solver,dtype,bad", [("exact", torch.float32, "inf"), ("auto", torch.float32, "inf"), ("auto", torch.bfloat16, "nan")])
def test_a_non_finite_weight_is_refused_by_name_before_any_module_is_replaced(solver, dtype, bad):
    """exact gave NaN factors and a normal report; auto failed inside LAPACK naming neither module nor cause."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama_config()).eval().to(dtype)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[0, 0] = float(bad)
    before = _state(model)
    with pytest.raises(SpecError, match=r"^model\.layers\.1\.self_attn\.o_proj\.weight has non-finite values \(inf/nan in 1 of 4096 entries\): cannot decompose it"):
        decompose_model(model, DecompositionSpec.from_args({"rank": 8, "solver": solver}), progress=False)
    assert _same_state(model, before)  # layer 1 comes first, but nothing was replaced


def test_a_non_finite_weight_in_a_later_layer_stops_calibrated_stages_before_the_first():
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama_config()).eval()
    with torch.no_grad():
        model.model.layers[3].mlp.down_proj.weight[5, 7] = float("nan")
    with pytest.raises(SpecError, match=r"^model\.layers\.3\.mlp\.down_proj\.weight has non-finite values"):
        decompose_model(model, DecompositionSpec.from_args({"rank": 2, "method": "whiten"}), stats_provider=_IdentityStats(), progress=False)
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())


def test_a_finite_weight_whose_sum_overflows_is_not_refused():
    from lm_eval_lowrank.decompose import check_decomposable

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama_config()).eval()
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.fill_(1e36)  # 4096 x 1e36 overflows the fp32 sum
    check_decomposable(model, make_plan(DecompositionSpec.from_args({"rank": 2}), model.config).targets)


def test_a_module_kept_dense_is_warned_about_once():
    """The config-side check before the load planned the decomposition too, so the break-even warning came twice."""
    import warnings

    from transformers import LlamaForCausalLM

    from conftest import tiny_llama_config
    from lm_eval_lowrank.api import compress_model, validate_against_config
    from lm_eval_lowrank.spec import DecompositionSpec

    spec = DecompositionSpec.from_args({"rank": 32, "layers": "1", "tensors": "q"})  # 64x64: break-even 32
    config = tiny_llama_config()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        validate_against_config(spec, config)
        report = compress_model(LlamaForCausalLM(config), spec, progress=False)
    kept = [w for w in seen if "kept dense" in str(w.message)]
    assert len(kept) == 1 and report.to_dict()["skipped"]


def test_experts_replaced_outside_a_watched_model_release_no_pages(monkeypatch):
    """benchmarks/moe.py replaces a block's experts with a fresh page releaser it never asked to watch a model: where
    the process had a safetensors file mapped (so the releaser had libc), it died on `_PageReleaser.live`, which
    only watch() set. An unwatched releaser now releases nothing."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import moe

    from lm_eval_lowrank import decompose as dec

    released = []
    real_init = dec._PageReleaser.__init__

    def with_libc(self):
        real_init(self)
        self.libc = object()  # as if a .safetensors file were mapped in this process

    monkeypatch.setattr(dec._PageReleaser, "__init__", with_libc)
    monkeypatch.setattr(dec._PageReleaser, "release", lambda self, *a: released.append(a))
    module, _ = moe.build(32, 48, 4, 2, torch.device("cpu"), torch.float32)
    solvers = moe.decompose_block(module, 2, 32, 48, 4)
    assert sum(solvers.values()) == 2 * 4 and released == []
