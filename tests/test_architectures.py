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
