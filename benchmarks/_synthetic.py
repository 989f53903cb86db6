"""Random-weight HF models of a known shape, for benchmarks where the timings, not the values, matter."""

from __future__ import annotations

import time
from pathlib import Path

import torch


def save_random_model(shape: str, out: Path, device: str = "cpu", dtype: str = "bfloat16", tokenizer_dir: Path | None = None, layers: int | None = None) -> float:
    """A causal LM of ``shape`` (a design_space built-in name: Llama, Mixtral, OLMoE, ...) with random weights,
    saved to ``out``; returns seconds.

    With ``tokenizer_dir`` the vocabulary is that tokenizer's (and it is saved beside the weights, so
    the harness can run the model); without it, the shape's own. ``layers`` keeps only the first N
    decoder layers (every layer keeps the shape's sizes). Experts get noise of a trained scale (the default
    init leaves some at 0, which a solver would find too easy).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from lm_eval_lowrank.design_space import load_config

    cfg = dict(load_config(shape))
    tok = AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else None
    if tok is not None:
        cfg["vocab_size"] = len(tok)
    if layers:
        cfg["num_hidden_layers"] = layers
    cfg.update(max_position_embeddings=4096, tie_word_embeddings=False)
    model_type = cfg.pop("model_type", "llama")
    config = AutoConfig.for_model(model_type, **{k: v for k, v in cfg.items() if not k.startswith("_")})
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config).to(getattr(torch, dtype))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".experts." in name:
                    p.normal_(0, 0.02)
    model.save_pretrained(out)
    if tok is not None:
        tok.save_pretrained(out)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return time.perf_counter() - t0


if __name__ == "__main__":  # for a benchmark that must build the model in a process of its own
    import argparse

    ap = argparse.ArgumentParser(description="Save a random-weight model of a built-in shape; prints the seconds it took.")
    ap.add_argument("shape")
    ap.add_argument("out", type=Path)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--tokenizer", type=Path, default=None, help="its vocabulary, saved beside the weights")
    a = ap.parse_args()
    print(save_random_model(a.shape, a.out, dtype=a.dtype, tokenizer_dir=a.tokenizer, layers=a.layers))
