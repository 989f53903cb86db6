"""Every architecture the config-side calculator claims to know, checked against a real model.

The parameter count, the tensor shapes and the layer paths come from the config alone (validation
before load, ``space``, sweeps); here each is compared with a tiny random-weight model built by
transformers from the same config, including the config switches that add parameters.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from lm_eval_lowrank.architectures import adapter_for_config, adapter_for_model, known_architectures
from lm_eval_lowrank.decompose import count_parameters, decompose_model
from lm_eval_lowrank.spec import DecompositionSpec

_DECODER = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=120,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
_SIGLIP = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)


def _gemma3(**vision):
    text = dict(_DECODER, head_dim=16)
    config = transformers.Gemma3Config(text_config=text, vision_config=dict(_SIGLIP, **vision), mm_tokens_per_image=4)
    return config, transformers.Gemma3ForConditionalGeneration


# model_type -> variants, each (config, model class). Every known architecture must be listed.
_CASES = {
    "llama": [
        (transformers.LlamaConfig(**_DECODER), transformers.LlamaForCausalLM),
        (transformers.LlamaConfig(**_DECODER, attention_bias=True, mlp_bias=True), transformers.LlamaForCausalLM),
        (transformers.LlamaConfig(**_DECODER, tie_word_embeddings=True, head_dim=32), transformers.LlamaForCausalLM),
    ],
    "mistral": [(transformers.MistralConfig(**_DECODER), transformers.MistralForCausalLM)],
    "qwen2": [
        (transformers.Qwen2Config(**_DECODER), transformers.Qwen2ForCausalLM),
        (transformers.Qwen2Config(**_DECODER, tie_word_embeddings=True), transformers.Qwen2ForCausalLM),
    ],
    "qwen3": [
        (transformers.Qwen3Config(**_DECODER, head_dim=16), transformers.Qwen3ForCausalLM),
        (transformers.Qwen3Config(**_DECODER, head_dim=32, attention_bias=True), transformers.Qwen3ForCausalLM),
    ],
    "olmo": [(transformers.OlmoConfig(**_DECODER), transformers.OlmoForCausalLM)],
    "olmo2": [(transformers.Olmo2Config(**_DECODER), transformers.Olmo2ForCausalLM)],
    "granite": [(transformers.GraniteConfig(**_DECODER, attention_bias=True, mlp_bias=True), transformers.GraniteForCausalLM)],
    "smollm3": [(transformers.SmolLM3Config(**_DECODER), transformers.SmolLM3ForCausalLM)],
    "gemma": [(transformers.GemmaConfig(**_DECODER, head_dim=16), transformers.GemmaForCausalLM)],
    "gemma2": [(transformers.Gemma2Config(**_DECODER, head_dim=16), transformers.Gemma2ForCausalLM)],
    "gemma3_text": [(transformers.Gemma3TextConfig(**_DECODER, head_dim=16), transformers.Gemma3ForCausalLM)],
    "gemma3": [_gemma3(), _gemma3(vision_use_head=False)],
    "gpt2": [(transformers.GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=120, n_positions=64), transformers.GPT2LMHeadModel)],
    "bert": [(transformers.BertConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, vocab_size=120), transformers.BertModel)],
}


def test_every_known_architecture_has_a_case():
    assert sorted(_CASES) == known_architectures()


@pytest.mark.parametrize(
    "model_type,variant", [(mt, i) for mt, variants in _CASES.items() for i in range(len(variants))], ids=lambda v: str(v)
)
def test_config_side_counts_match_the_built_model(model_type, variant):
    config, model_cls = _CASES[model_type][variant]
    torch.manual_seed(0)
    model = model_cls(config)
    adapter = adapter_for_config(config)
    assert adapter is not None and model_type in adapter.model_types
    assert adapter.param_count(config) == count_parameters(model)
    if model_type == "bert":
        return  # config side only: the encoder is not an lm-eval causal LM
    assert adapter_for_model(model).name == adapter.name  # the config's layer path exists in the model
    layers = adapter.layers(model)
    assert len(layers) == adapter.num_layers(config)
    for tensor, (out_f, in_f) in adapter.tensor_shapes(config).items():
        weight = model.get_submodule(adapter.module_path(len(layers) - 1, tensor)).weight
        shape = tuple(weight.shape) if model_type != "gpt2" else tuple(weight.shape[::-1])  # Conv1D is (in, out)
        assert shape == (out_f, in_f), tensor


def test_multimodal_gemma3_decomposes_its_language_model():
    config, model_cls = _gemma3(vision_use_head=False)
    torch.manual_seed(0)
    model = model_cls(config).eval()
    before = count_parameters(model)
    report = decompose_model(model, DecompositionSpec.from_args({"rank": 2, "layers": "2|3", "tensors": "q|down"}), progress=False)
    assert [t.path for t in report.plan.targets][0].startswith("model.language_model.layers.1.")
    assert len(report.plan.targets) == 4 and report.params_after == count_parameters(model) < before
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.randint(3, 120, (1, 6))).logits).all()


# -- architectures without an adapter: read off an empty model of the config -----------------------------------
_UNADAPTED = {
    "gpt_neox": (
        transformers.GPTNeoXConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, vocab_size=120),
        transformers.GPTNeoXForCausalLM,
    ),
    "opt": (
        transformers.OPTConfig(hidden_size=64, ffn_dim=96, num_hidden_layers=3, num_attention_heads=4, vocab_size=120, word_embed_proj_dim=32),
        transformers.OPTForCausalLM,
    ),
    "phi3": (transformers.Phi3Config(**_DECODER), transformers.Phi3ForCausalLM),
    "mixtral": (transformers.MixtralConfig(**_DECODER, num_local_experts=4), transformers.MixtralForCausalLM),
}


@pytest.mark.parametrize("model_type", sorted(_UNADAPTED))
@pytest.mark.parametrize("as_dict", [False, True], ids=["config", "config.json"])
def test_unadapted_architecture_is_read_off_an_empty_model(model_type, as_dict):
    from lm_eval_lowrank.architectures import GenericAdapter, config_side_adapter

    config, model_cls = _UNADAPTED[model_type]
    assert adapter_for_config(config) is None
    side = config_side_adapter(config.to_dict() if as_dict else config)
    torch.manual_seed(0)
    model = model_cls(config)
    loaded = adapter_for_model(model)
    assert isinstance(side, GenericAdapter) and isinstance(loaded, GenericAdapter)
    assert side.param_count(config) == count_parameters(model)
    assert (side.layers_path, side.tensor_paths, side.num_layers(config)) == (loaded.layers_path, loaded.tensor_paths, 3)
    assert side.tensor_shapes(config) == loaded.tensor_shapes(config)


def test_unadapted_architecture_bad_input_fails_before_weights_load(monkeypatch, tmp_path):
    from lm_eval_lowrank.harness import HFTuckerLM
    from lm_eval_lowrank.spec import SpecError

    _UNADAPTED["gpt_neox"][0].save_pretrained(tmp_path)  # a config, and no weights at all

    def _no_load(*a, **k):
        raise AssertionError("weights were loaded before the arguments were checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", _no_load)
    with pytest.raises(SpecError, match=r"layer 5 is past the end; this model has 3 decoder layers, valid 1..3"):
        HFTuckerLM(pretrained=str(tmp_path), device="cpu", rank=1, layers=5)
    with pytest.raises(SpecError, match=r"valid: query_key_value\|dense\|dense_h_to_4h\|dense_4h_to_h"):
        HFTuckerLM(pretrained=str(tmp_path), device="cpu", rank=1, tensors="q")


def test_calculator_costs_an_unadapted_architecture_exactly():
    from lm_eval_lowrank.design_space import calculate, config_adapter
    from lm_eval_lowrank.spec import SpecError

    config, model_cls = _UNADAPTED["opt"]
    model = model_cls(config)
    report = calculate(config.to_dict(), {"rank": 2, "layers": "1|3", "tensors": "fc1|fc2"})
    assert report.adapter == "generic" and report.params_total == count_parameters(model)
    assert report.params_removed == 2 * 2 * (96 * 64 - 2 * (96 + 64)) and report.decomposed_modules == 4
    assert report.linear_flops_before == 2 * (3 * (4 * 64 * 64 + 2 * 96 * 64) + 120 * 32)  # OPT's head is 32 wide
    with pytest.raises(SpecError, match=r"^model_type='not_a_model' is invalid: transformers cannot build"):
        config_adapter({"model_type": "not_a_model", "hidden_size": 8})


def test_generic_adapter_offers_each_linear_in_the_layers_that_hold_it_with_one_shape():
    from torch import nn

    from lm_eval_lowrank.architectures import GenericAdapter

    class Block(nn.Module):
        def __init__(self, dense: bool):
            super().__init__()
            self.proj = nn.Linear(8, 8)
            self.mlp = nn.Sequential(nn.Linear(8, 16 if dense else 12))  # same path, another shape
            if not dense:
                self.router = nn.Linear(8, 4)  # only in the later layers

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block(True), Block(False), Block(False)])

    adapter = GenericAdapter.from_model(Toy())
    # a path whose shape changes between layers is not offered; one that only some layers hold is, for those
    assert (adapter.layers_path, adapter.tensor_paths, adapter.tensor_shapes(None)) == ("blocks", {"proj": "proj", "router": "router"}, {"proj": (8, 8), "router": (4, 8)})
    assert adapter.layers_of("proj", 3) == (1, 2, 3) and adapter.layers_of("router", 3) == (2, 3)


def test_generic_adapter_takes_the_outermost_layer_list_the_config_counts():
    """Experts kept in a list (transformers 4's Mixtral, DeepSeek's remote code) nest one list per layer, longer
    than the layer list; a vision tower's list can be longer than the language model's."""
    from conftest import list_experts_model

    from lm_eval_lowrank.architectures import GenericAdapter

    for text_layers, vision_layers in ((2, 0), (2, 4), (3, 5)):
        adapter = GenericAdapter.from_model(list_experts_model(text_layers, vision_layers))
        assert (adapter.layers_path, adapter.num_layers(None)) == ("layers", text_layers)
        # the router is never offered; expert 0's w1 does not take the bare name "w1"
        assert list(adapter.tensor_paths) == ["q_proj"] + [f"experts.{e}.w1" for e in range(6)]
    no_count = list_experts_model(2, 4)
    del no_count.config
    assert GenericAdapter.from_model(no_count).layers_path == "vision"  # without a config: the longest outer list


def test_generic_adapter_never_offers_a_router_beside_stacked_experts():
    """PhiMoE (no adapter of its own) keeps a Linear mlp.router beside transformers' stacked experts: a rank-1
    router would move every token's choice of experts, and tensors=all with rank 1..3 took it (it saves there)."""
    from lm_eval_lowrank.architectures import GenericAdapter

    config = transformers.PhimoeConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, vocab_size=100, eos_token_id=2
    )
    adapter = GenericAdapter.from_config(config)
    assert "router" not in adapter.tensor_paths
    assert {"q_proj", "o_proj", "experts.gate_up_proj", "experts.down_proj"} <= set(adapter.tensor_paths)


# -- tie_word_embeddings left out of a config.json: transformers' default for the model_type -------------------
def _count_built(model_type: str, model_cls=transformers.AutoModelForCausalLM, **fields) -> int:
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(model_type, **fields)
    model = model_cls.from_config(config) if model_cls is transformers.AutoModelForCausalLM else model_cls(config)
    return count_parameters(model)


@pytest.mark.parametrize("model_type", ["gemma", "gemma2", "gemma3_text"])
def test_gemma_config_json_without_the_tie_key_counts_the_head_once(model_type):
    """Gemma's published config.json files leave tie_word_embeddings out and transformers ties them; an explicit
    false is still an untied head."""
    from lm_eval_lowrank.design_space import calculate

    fields = dict(_DECODER, head_dim=16)
    head = 120 * 64
    for tie in (None, False, True):
        config_json = {"model_type": model_type, **fields, **({} if tie is None else {"tie_word_embeddings": tie})}
        built = _count_built(model_type, **{k: v for k, v in config_json.items() if k != "model_type"})
        assert adapter_for_config(config_json).param_count(config_json) == built, tie
        assert calculate(config_json).params_total == built, tie
        if tie is None:
            tied_total = built
    assert _count_built(model_type, **fields, tie_word_embeddings=False) == tied_total + head  # the cases differ


def test_multimodal_gemma3_config_json_ties_by_its_top_level_flag():
    """The wrapper's own flag decides, as in transformers; left out it is Gemma-3's default (tied), whatever the
    text config says."""
    text = dict(_DECODER, head_dim=16, model_type="gemma3_text")
    for outer, inner in ((None, None), (False, None), (None, False)):
        text_json = dict(text, **({} if inner is None else {"tie_word_embeddings": inner}))
        config_json = {"model_type": "gemma3", "text_config": text_json, "vision_config": dict(_SIGLIP, vision_use_head=False), "mm_tokens_per_image": 4}
        if outer is not None:
            config_json["tie_word_embeddings"] = outer
        built = _count_built("gemma3", transformers.Gemma3ForConditionalGeneration, **{k: v for k, v in config_json.items() if k != "model_type"})
        assert adapter_for_config(config_json).param_count(config_json) == built, (outer, inner)


def test_gpt2_with_an_untied_head_counts_it():
    fields = dict(n_embd=64, n_layer=2, n_head=4, vocab_size=120, n_positions=64)
    for tie in (None, False):
        config_json = {"model_type": "gpt2", **fields, **({} if tie is None else {"tie_word_embeddings": tie})}
        built = _count_built("gpt2", transformers.GPT2LMHeadModel, **{k: v for k, v in config_json.items() if k != "model_type"})
        assert adapter_for_config(config_json).param_count(config_json) == built, tie
    assert built == _count_built("gpt2", transformers.GPT2LMHeadModel, **fields) + 120 * 64


def test_tie_default_of_an_unknown_model_type_is_untied():
    from lm_eval_lowrank.architectures import tied_word_embeddings

    assert tied_word_embeddings({"model_type": "not_a_model"}) is False
    assert tied_word_embeddings({}) is False
    assert tied_word_embeddings({"model_type": "gemma2"}) is True and tied_word_embeddings({"model_type": "llama"}) is False
