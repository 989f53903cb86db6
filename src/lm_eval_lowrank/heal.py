"""Healing fine-tune: a short causal-LM training run of the low-rank factors only.

Only the ``first``/``core``/``last`` factors of :class:`LowRankLinear` modules train; every
other weight (embeddings, norms, dense projections) stays frozen, so the healed model has
exactly the parameter count of the compressed one and saves as an ordinary checkpoint.
LoRA via peft is not used: peft wraps ``nn.Linear``/``Conv1D``-like modules, and the factors
are already a low-rank parameterisation that trains directly at the same cost.

Default data: ``gsm8k/train.jsonl`` from the shared benchmark folder, the only *train* split
there. No local task evaluates it (``gsm8k_local`` scores the test split and draws few-shot
examples from train). WikiText is never trained on by default: its only split is the test
split that ``wikitext_local`` evaluates, so it serves as held-out text for perplexity.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .modules import LowRankLinear

TEXT_SUFFIXES = (".jsonl", ".json", ".txt", ".raw")


class HealError(ValueError):
    """Bad healing input. The message is one line naming the argument."""


def default_heal_data() -> Path:
    from .tasks import data_dir

    return data_dir() / "gsm8k" / "train.jsonl"


def default_eval_data() -> Path:
    from .tasks import data_dir

    return data_dir() / "wikitext" / "wiki.test.raw"


def _record_text(obj: Any) -> str:
    if isinstance(obj, str):
        return obj
    if not isinstance(obj, dict):
        return ""
    for key in ("text", "page", "passage", "content"):
        if isinstance(obj.get(key), str):
            return obj[key]
    if isinstance(obj.get("question"), str) and isinstance(obj.get("answer"), str):
        return obj["question"] + "\n" + obj["answer"]
    return "\n".join(v for v in obj.values() if isinstance(v, str))


def read_texts(path: str | os.PathLike, arg: str = "--data") -> list[str]:
    """Texts from a .jsonl/.json file (fields text/page/question+answer/...), a .txt/.raw file, or a folder of them."""
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in TEXT_SUFFIXES)
        if not files:
            raise HealError(f"{arg} {p}: the folder holds no {'/'.join(TEXT_SUFFIXES)} files")
        return [t for f in files for t in read_texts(f, arg)]
    if not p.is_file():
        raise HealError(f"{arg} {p} does not exist; give a .jsonl/.txt/.raw file or a folder of them")
    if p.suffix not in TEXT_SUFFIXES:
        raise HealError(f"{arg} {p}: unsupported file type {p.suffix!r}; valid: {', '.join(TEXT_SUFFIXES)}")
    if p.suffix in (".txt", ".raw"):
        return [p.read_text(encoding="utf-8")]
    if p.suffix == ".json":
        data = json.loads(p.read_text(encoding="utf-8"))
        rows = data if isinstance(data, list) else [data]
    else:
        rows = [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    texts = [t for t in (_record_text(r) for r in rows) if t.strip()]
    if not texts:
        raise HealError(f"{arg} {p}: no text found (expected a 'text', 'page' or 'question'/'answer' field)")
    return texts


def token_blocks(tokenizer: Any, texts: Iterable[str], seq_len: int, max_blocks: int | None = None) -> torch.Tensor:
    """Concatenate texts (EOS between documents) and cut them into non-overlapping blocks."""
    if seq_len < 2:
        raise HealError(f"--seq_len {seq_len} is invalid: expected an int >= 2")
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    need = None if max_blocks is None else max_blocks * seq_len
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        if need is not None and len(ids) >= need:
            break
    n = len(ids) // seq_len
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n == 0:
        raise HealError(f"the text has {len(ids)} tokens, fewer than one block of --seq_len {seq_len}")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def factor_parameters(model: nn.Module, train_bias: bool = False) -> list[nn.Parameter]:
    params: list[nn.Parameter] = []
    for mod in model.modules():
        if isinstance(mod, LowRankLinear):
            params += [p for p in (mod.first, mod.core, mod.last) if p is not None]
            if train_bias and mod.bias is not None:
                params.append(mod.bias)
    return params


@torch.no_grad()
def mean_loss(model: nn.Module, blocks: torch.Tensor, batch_size: int = 4) -> float:
    """Token-weighted mean next-token loss over ``blocks`` (eval mode, no grad)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        x = blocks[i : i + batch_size].to(device)
        loss = model(input_ids=x, labels=x).loss
        n = x.numel() - x.shape[0]  # shifted targets per block
        total += float(loss) * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


def perplexity(model: nn.Module, blocks: torch.Tensor, batch_size: int = 4) -> float:
    return math.exp(mean_loss(model, blocks, batch_size))


def _bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc="healing", unit="step", file=sys.stderr)
    except ImportError:  # pragma: no cover
        return None


def heal_model(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    steps: int,
    lr: float = 1e-4,
    seq_len: int = 128,
    batch_size: int = 4,
    seed: int = 0,
    warmup: int | None = None,
    holdout_blocks: int = 8,
    train_bias: bool = False,
    grad_clip: float = 1.0,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the factors of ``model`` in place for ``steps`` AdamW steps; return the healing record.

    The first ``holdout_blocks`` blocks of the data are kept out of training and give
    ``loss_before``/``loss_after`` on the training distribution.
    """
    if steps < 1:
        raise HealError(f"--steps {steps} is invalid: expected an int >= 1")
    if lr <= 0:
        raise HealError(f"--lr {lr} is invalid: expected a positive float")
    if batch_size < 1:
        raise HealError(f"--batch_size {batch_size} is invalid: expected an int >= 1")
    params = factor_parameters(model, train_bias)
    if not params:
        raise HealError("the model has no LowRankLinear modules to heal; decompose it first (lm-eval-lowrank decompose)")
    torch.manual_seed(seed)
    blocks = token_blocks(tokenizer, texts, seq_len, max_blocks=holdout_blocks + steps * batch_size)
    if len(blocks) <= holdout_blocks:
        raise HealError(f"--data has only {len(blocks)} blocks of {seq_len} tokens; need more than {holdout_blocks} (held out) to train")
    held, train = blocks[:holdout_blocks], blocks[holdout_blocks:]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    loss_before = mean_loss(model, held, batch_size)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, steps // 10) if warmup is None else max(0, warmup)
    # Linear warmup, then cosine decay to 10% of lr: stable on few steps and tiny batches.
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, steps - warm)))
    )
    device = next(model.parameters()).device
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    model.train()
    losses: list[float] = []
    bar = _bar(steps, progress)
    start = time.perf_counter()
    pos = 0
    for _step in range(steps):
        idx = [order[(pos + j) % len(order)] for j in range(batch_size)]
        pos += batch_size
        x = train[idx].to(device)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if bar is not None:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - start
    for p in params:
        p.requires_grad_(False)
    model.eval()
    loss_after = mean_loss(model, held, batch_size)
    k = max(1, min(5, steps // 4))
    return {
        "mode": "factors",
        "steps": steps,
        "lr": lr,
        "schedule": f"linear warmup {warm} steps, cosine to 0.1*lr",
        "seq_len": seq_len,
        "batch_size": batch_size,
        "seed": seed,
        "train_bias": train_bias,
        "trained_params": sum(p.numel() for p in params),
        "train_tokens": steps * batch_size * seq_len,
        "holdout_blocks": holdout_blocks,
        "loss_before": loss_before,
        "loss_after": loss_after,
        "train_loss_first": sum(losses[:k]) / k,
        "train_loss_last": sum(losses[-k:]) / k,
        "seconds": seconds,
        "device": str(device),
    }


def heal_checkpoint(
    path: str | os.PathLike,
    out: str | os.PathLike,
    data: str | os.PathLike | None = None,
    steps: int = 50,
    lr: float = 1e-4,
    seq_len: int = 128,
    batch_size: int = 4,
    seed: int = 0,
    device: str | None = None,
    eval_data: str | os.PathLike | None = None,
    eval_blocks: int = 16,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Heal the compressed checkpoint at ``path`` and save it to ``out``; returns the healing record.

    With ``eval_data`` (e.g. wikitext's wiki.test.raw, never trained on by default) the record
    also holds held-out perplexity before and after.
    """
    from transformers import AutoTokenizer

    from .checkpoint import CompressedCheckpoint, save_compressed

    ckpt = CompressedCheckpoint.open(path)
    data_path = Path(data).expanduser().resolve() if data is not None else default_heal_data()
    texts = read_texts(data_path, "--data")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = ckpt.load_model(dtype=torch.float32, device=device)  # train in fp32 whatever is stored
    stored = ckpt.manifest.get("dtype")
    tokenizer = AutoTokenizer.from_pretrained(str(ckpt.path))
    eval_blocks_t = None
    ppl_before = None
    if eval_data is not None:
        eval_blocks_t = token_blocks(tokenizer, read_texts(eval_data, "--eval_data"), seq_len, max_blocks=eval_blocks)
        ppl_before = perplexity(model, eval_blocks_t, batch_size)
    record = heal_model(model, tokenizer, texts, steps, lr=lr, seq_len=seq_len, batch_size=batch_size, seed=seed, progress=progress)
    record["data"] = str(data_path)
    record["data_split"] = data_path.stem if data_path.is_file() else data_path.name
    if eval_blocks_t is not None:
        record["eval_data"] = str(Path(eval_data).expanduser().resolve())
        record["eval_tokens"] = int(eval_blocks_t.numel())
        record["eval_ppl_before"] = ppl_before
        record["eval_ppl_after"] = perplexity(model, eval_blocks_t, batch_size)
    if isinstance(stored, str) and stored != "float32":
        model.to(getattr(torch, stored))  # save in the dtype the checkpoint had
    healing = list(ckpt.manifest.get("healing") or []) + [record]
    save_compressed(model, out, ckpt.manifest["decomposition"], tokenizer=tokenizer, source=ckpt.manifest.get("source"), healing=healing, overwrite=overwrite)
    return record
