"""Random-weight HF models of a known shape, for benchmarks where the timings, not the values, matter."""

from __future__ import annotations

import time
from pathlib import Path

import torch


def save_random_llama(shape: str, out: Path, device: str = "cpu", dtype: str = "bfloat16", tokenizer_dir: Path | None = None, layers: int | None = None) -> float:
    """A Llama of ``shape`` (a design_space built-in name) with random weights, saved to ``out``; returns seconds.

    With ``tokenizer_dir`` the vocabulary is that tokenizer's (and it is saved beside the weights, so
    the harness can run the model); without it, the shape's own. ``layers`` keeps only the first N
    decoder layers (every layer keeps the shape's sizes).
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lm_eval_lowrank.design_space import load_config

    cfg = dict(load_config(shape))
    tok = AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else None
    if tok is not None:
        cfg["vocab_size"] = len(tok)
    if layers:
        cfg["num_hidden_layers"] = layers
    cfg.update(max_position_embeddings=4096, tie_word_embeddings=False)
    cfg.pop("model_type", None)
    config = LlamaConfig(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(out)
    if tok is not None:
        tok.save_pretrained(out)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return time.perf_counter() - t0
