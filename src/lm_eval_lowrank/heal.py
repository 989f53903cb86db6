"""Healing fine-tune: a short causal-LM training run of the low-rank factors only.

Only the ``first``/``core``/``last`` factors of :class:`LowRankLinear` modules (and of decomposed
mixture-of-experts projections, :class:`LowRankExpertWeights`) train; every
other weight (embeddings, norms, dense projections) stays frozen, so the healed model has
exactly the parameter count of the compressed one and saves as an ordinary checkpoint.
LoRA via peft is not used: peft wraps ``nn.Linear``/``Conv1D``-like modules, and the factors
are already a low-rank parameterisation that trains directly at the same cost.

Default data: ``gsm8k/train.jsonl`` from the shared benchmark folder, the only *train* split
there. No local task evaluates it (``gsm8k_local`` scores the test split and draws few-shot
examples from train). WikiText is never trained on by default: its only split is the test
split that ``wikitext_local`` evaluates, so it serves as held-out text for perplexity.

Distillation (``teacher=``): the loss is the KL divergence from the teacher's next-token
distribution (usually the dense source model) to the student's, at a temperature, optionally
mixed with the plain LM loss (``kd_weight`` < 1). The target is then the dense model's
behaviour rather than the labels, so prompts shaped like a task's (ARC validation, MMLU dev)
are fair training text as long as that split is not one an evaluated task scores: the record
lists, per data file, the local tasks that score it (``scored_by``).
Several data sources mix evenly: the ``steps * batch_size`` training blocks are split into
shares that differ by at most one block, and each block trains once; the record's ``data_mix``
counts what each source gave.

``heal_checkpoint`` trains the factors in fp32; at the end they are rounded to the dtype each
was stored in, and the "after" numbers (``loss_after``, ``kl_after``, ``eval_ppl_after``) are
measured on those rounded factors, so they describe the checkpoint that is saved.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .modules import LowRankExpertWeights, LowRankLinear

TEXT_SUFFIXES = (".jsonl", ".json", ".txt", ".raw")
TEACHER_DENSE = "dense"  # --teacher value meaning "the checkpoint's source model"
HOLDOUT_BLOCKS = 8  # training-text blocks kept out of training for loss_before/loss_after
DEFAULT_EVAL_BLOCKS = 16  # blocks of --eval_data scored when --eval_blocks is not given


class HealError(ValueError):
    """Bad healing input. The message is one line naming the argument."""


def default_heal_data() -> Path:
    from .tasks import data_dir

    return data_dir() / "gsm8k" / "train.jsonl"


def default_eval_data() -> Path:
    from .tasks import data_dir

    return data_dir() / "wikitext" / "wiki.test.raw"


def _mc_answer(obj: dict[str, Any]) -> str | None:
    """The correct choice's text of an ARC-style (choices.text/label + answerKey) or MMLU-style
    (choices list + answer index) record; None when the record is not one of those."""
    choices, answer = obj.get("choices"), obj.get("answerKey", obj.get("answer"))
    if isinstance(choices, dict) and isinstance(choices.get("text"), list) and isinstance(choices.get("label"), list):
        labels = [str(x) for x in choices["label"]]
        if str(answer) in labels:
            return str(choices["text"][labels.index(str(answer))])
        return None
    if isinstance(choices, list) and isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
        return str(choices[answer])
    return None


def _record_text(obj: Any) -> str:
    if isinstance(obj, str):
        return obj
    if not isinstance(obj, dict):
        return ""
    for key in ("text", "page", "passage", "content"):
        if isinstance(obj.get(key), str):
            return obj[key]
    if isinstance(obj.get("question"), str) and "choices" in obj:
        # Multiple choice (ARC, MMLU dev): question + correct answer, in the shape of the
        # arc_easy prompt ("Question: ...\nAnswer: ..."), which a teacher then scores.
        answer = _mc_answer(obj)
        if answer is not None:
            return f"Question: {obj['question'].strip()}\nAnswer: {answer}"
    if isinstance(obj.get("question"), str) and isinstance(obj.get("answer"), str):
        return obj["question"] + "\n" + obj["answer"]
    return "\n".join(v for v in obj.values() if isinstance(v, str))


def read_texts(path: str | os.PathLike, arg: str = "--data") -> list[str]:
    """Texts from a .jsonl/.json file (fields text/page/question+answer/question+choices...), a .txt/.raw file, or a folder of them."""
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
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise HealError(f"{arg} {p}: cannot be read ({exc.strerror})") from None
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise HealError(f"{arg} {p} line {line}: not UTF-8 text (byte {exc.start}); re-encode the file as UTF-8") from None
    if p.suffix in (".txt", ".raw"):
        return [text]
    if p.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise HealError(f"{arg} {p} line {exc.lineno}: not valid JSON ({exc.msg})") from None
        rows = data if isinstance(data, list) else [data]
    else:
        rows = []
        # split on "\n" only: a JSON string may hold U+2028 and the like, which splitlines() would cut
        for n, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise HealError(f"{arg} {p} line {n}: not valid JSON ({exc.msg}); a .jsonl file holds one JSON record per line") from None
    texts = [t for t in (_record_text(r) for r in rows) if t.strip()]
    if not texts:
        raise HealError(f"{arg} {p}: no text found (expected a 'text', 'page', 'question'/'answer' or 'question'/'choices' field)")
    return texts


def token_blocks(tokenizer: Any, texts: Iterable[str], seq_len: int, max_blocks: int | None = None, what: str | None = None) -> torch.Tensor:
    """Concatenate texts (EOS between documents) and cut them into non-overlapping blocks.

    ``what`` names the text in errors, as the CLI spells it (e.g. ``"--eval_data FILE"``).
    """
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
        raise HealError(f"{what or 'the text'} has {len(ids)} tokens, fewer than one block of --seq_len {seq_len}; give more text or a smaller --seq_len")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def factor_parameters(model: nn.Module, train_bias: bool = False) -> list[nn.Parameter]:
    params: list[nn.Parameter] = []
    for mod in model.modules():
        if isinstance(mod, (LowRankLinear, LowRankExpertWeights)):
            params += [p for p in (mod.first, mod.core, mod.last) if p is not None]
            if train_bias and getattr(mod, "bias", None) is not None:  # experts keep their biases on their module
                params.append(mod.bias)
    return params


@torch.no_grad()
def _token_mean(model: nn.Module, blocks: torch.Tensor, batch_size: int, per_batch: Any) -> float:
    """Token-weighted mean of ``per_batch(x) -> (mean value, tokens)`` over ``blocks``, in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for i in range(0, len(blocks), batch_size):
            value, n = per_batch(blocks[i : i + batch_size].to(device))
            total += value * n
            count += n
    finally:  # an error (e.g. out of memory) must not leave the caller's model in eval mode
        model.train(was_training)
    return total / max(count, 1)


def mean_loss(model: nn.Module, blocks: torch.Tensor, batch_size: int = 4) -> float:
    """Token-weighted mean next-token loss over ``blocks`` (eval mode, no grad)."""
    # shifted targets: one fewer per block than tokens
    return _token_mean(model, blocks, batch_size, lambda x: (float(model(input_ids=x, labels=x).loss), x.numel() - x.shape[0]))


def perplexity(model: nn.Module, blocks: torch.Tensor, batch_size: int = 4) -> float:
    loss = mean_loss(model, blocks, batch_size)
    return math.exp(loss) if loss < 709.0 else math.inf  # a diverged heal is recorded (inf), not an OverflowError before saving


def _bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc="healing", unit="step", file=sys.stderr)
    except ImportError:  # pragma: no cover
        return None


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean per-token KL(teacher || student) of the softened next-token distributions, times T^2.

    The T^2 factor keeps the gradient scale independent of the temperature (Hinton et al.).
    Every position counts: each one is a next-token distribution the evaluation scores.
    """
    v = student_logits.shape[-1]
    s = F.log_softmax(student_logits.reshape(-1, v).float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.reshape(-1, v).float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * (temperature * temperature)


def mean_kl(model: nn.Module, teacher: nn.Module, blocks: torch.Tensor, batch_size: int = 4) -> float:
    """Mean per-token KL(teacher || model) at temperature 1 over ``blocks`` (eval mode, no grad)."""
    return _token_mean(model, blocks, batch_size, lambda x: (float(kd_loss(model(input_ids=x).logits, teacher(input_ids=x).logits)), x.numel()))


def check_heal_args(steps: int = 1, lr: float = 1e-4, batch_size: int = 1, teacher: Any = None, kd_weight: float | None = None, temperature: float | None = None) -> None:
    """One-line :class:`HealError` for a bad optimisation or distillation argument (cheap: call it before loading weights)."""
    if not isinstance(steps, int) or steps < 1:
        raise HealError(f"--steps {steps} is invalid: expected an int >= 1")
    if not (lr > 0 and math.isfinite(lr)):  # inf/nan pass a plain > 0 check and train NaN factors
        raise HealError(f"--lr {lr} is invalid: expected a positive finite float")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise HealError(f"--batch_size {batch_size} is invalid: expected an int >= 1")
    if teacher is None:
        if kd_weight is not None:
            raise HealError(f"--kd_weight {kd_weight} needs --teacher (e.g. --teacher {TEACHER_DENSE}); without a teacher the loss is the plain LM loss")
        if temperature is not None:
            raise HealError(f"--temperature {temperature} needs --teacher (e.g. --teacher {TEACHER_DENSE}); without a teacher the loss is the plain LM loss")
        return
    if kd_weight is not None and not 0.0 <= kd_weight <= 1.0:
        raise HealError(f"--kd_weight {kd_weight} is invalid: expected a float in [0, 1] (1 = KD loss only, 0 = LM loss only)")
    if temperature is not None and not (temperature > 0 and math.isfinite(temperature)):
        raise HealError(f"--temperature {temperature} is invalid: expected a positive float (1 = the teacher's own distribution)")


def _split_evenly(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def mixed_blocks(
    tokenizer: Any,
    sources: Sequence[Sequence[str]],
    seq_len: int,
    train_blocks: int,
    holdout_blocks: int,
    names: Sequence[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, int]]]:
    """(held-out blocks, training blocks, per-source counts) with the sources mixed evenly.

    Each source gives its share of the held-out blocks first, then its share of the
    ``train_blocks`` training blocks: the shares differ by at most one and sum to ``train_blocks``,
    so with ``train_blocks = steps * batch_size`` each training block trains exactly once and the
    counts are what trained. A short source repeats its own training blocks (never its held-out
    ones) to fill its share. One source keeps the single-file behaviour: the training blocks are
    those the text holds, up to ``train_blocks``. ``names`` (e.g. the files) label the sources in
    errors and in the counts (``"source"``).
    """
    k = len(sources)
    labels: list[str | None] = list(names) if names is not None else [None] * k
    if len(labels) != k:
        raise HealError(f"names: {len(labels)} names for {k} sources")
    names = [f"--data {label}" if label is not None else "--data" if k == 1 else f"--data source {i + 1}" for i, label in enumerate(labels)]
    if k > train_blocks:  # a source with no training block would be mixed in name only
        raise HealError(f"--data gives {k} sources but --steps x --batch_size is {train_blocks} blocks; expected at least one block per source")
    held_share = _split_evenly(holdout_blocks, k)
    train_share = _split_evenly(train_blocks, k)
    helds, trains, info = [], [], []
    for texts, h, share, name, label in zip(sources, held_share, train_share, names, labels):
        b = token_blocks(tokenizer, texts, seq_len, max_blocks=h + share, what=name)
        if len(b) <= h:
            raise HealError(f"{name} has only {len(b)} blocks of --seq_len {seq_len} tokens; need more than {h} (held out) to train")
        held, train = b[:h], b[h:]
        n = len(train)
        if k > 1 and n < share:
            train = train[torch.arange(share) % n]  # fill the source's share from its own blocks
        helds.append(held)
        trains.append(train)
        info.append({**({"source": label} if label is not None else {}), "held_blocks": h, "train_blocks": len(train), "distinct_train_blocks": n})
    return torch.cat(helds), torch.cat(trains), info


def _round_factors(model: nn.Module, params: Sequence[nn.Parameter], round_to: torch.dtype | Mapping[str, torch.dtype] | None) -> None:
    """Round the trained ``params`` in place to ``round_to`` (one dtype, or parameter name -> dtype), keeping their dtype."""
    if round_to is None:
        return
    names = {id(p): n for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in params:
            dtype = round_to if isinstance(round_to, torch.dtype) else round_to.get(names.get(id(p), ""), p.dtype)
            if dtype != p.dtype:
                p.copy_(p.to(dtype))


def heal_model(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str] | Sequence[Sequence[str]] | None,
    steps: int,
    lr: float = 1e-4,
    seq_len: int = 128,
    batch_size: int = 4,
    seed: int = 0,
    warmup: int | None = None,
    holdout_blocks: int = HOLDOUT_BLOCKS,
    train_bias: bool = False,
    grad_clip: float = 1.0,
    progress: bool = True,
    teacher: nn.Module | None = None,
    kd_weight: float | None = None,
    temperature: float | None = None,
    blocks: tuple[torch.Tensor, torch.Tensor, list[dict[str, int]]] | None = None,
    round_to: torch.dtype | Mapping[str, torch.dtype] | None = None,
) -> dict[str, Any]:
    """Train the factors of ``model`` in place for ``steps`` AdamW steps; return the healing record.

    ``texts``: one source (a list of strings) or several (a list of lists), mixed evenly.
    The first ``holdout_blocks`` blocks of the data (split over the sources) are kept out of
    training and give ``loss_before``/``loss_after`` (and with a teacher ``kl_before``/``kl_after``).
    ``blocks``: instead of ``texts``, what :func:`mixed_blocks` made of them beforehand (with
    ``train_blocks = steps * batch_size``), so that bad data is refused before the weights load.
    ``round_to``: the dtype the factors will be stored in (one dtype, or parameter name -> dtype);
    the trained factors are rounded to it before the "after" numbers are measured, so those
    describe the stored model. The model's training mode and ``requires_grad`` flags are restored
    on return, also when training fails.

    With ``teacher`` (a dense model with the same vocabulary, run in eval mode under no_grad)
    the loss is ``kd_weight * T^2 * KL(teacher_T || student_T) + (1 - kd_weight) * LM loss``,
    with ``kd_weight`` 1 and ``temperature`` T 1 by default.
    """
    check_heal_args(steps, lr, batch_size, teacher, kd_weight, temperature)
    if not isinstance(holdout_blocks, int) or isinstance(holdout_blocks, bool) or holdout_blocks < 1:
        raise HealError(f"holdout_blocks={holdout_blocks!r} is invalid: expected an int >= 1 (the held-out blocks give loss_before/loss_after)")
    if blocks is not None and len(blocks[0]) == 0:
        raise HealError("blocks: no held-out blocks; build them with mixed_blocks(..., holdout_blocks >= 1)")
    params = factor_parameters(model, train_bias)
    if not params:
        raise HealError("the model has no LowRankLinear modules to heal; decompose it first (lm-eval-lowrank decompose)")
    if teacher is not None:
        kd_weight = 1.0 if kd_weight is None else float(kd_weight)
        temperature = 1.0 if temperature is None else float(temperature)
        sv, tv = model.get_output_embeddings().weight.shape[0], teacher.get_output_embeddings().weight.shape[0]
        if sv != tv:
            raise HealError(f"--teacher has a vocabulary of {tv} tokens, the student {sv}: the teacher must share the student's tokenizer")
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    torch.manual_seed(seed)
    if blocks is None:
        sources = [list(texts or [])] if not texts or isinstance(texts[0], str) else [list(t) for t in texts]
        blocks = mixed_blocks(tokenizer, sources, seq_len, steps * batch_size, holdout_blocks)
    held, train, mix = blocks
    # Restored in the finally below, whether training ends or raises (e.g. out of memory).
    was_training = model.training
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    bar = None
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        loss_before = mean_loss(model, held, batch_size)
        kl_before = mean_kl(model, teacher, held, batch_size) if teacher is not None else None
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
        use_lm = teacher is None or kd_weight < 1.0
        use_kd = teacher is not None and kd_weight > 0.0
        losses: list[float] = []
        kd_losses: list[float] = []
        bar = _bar(steps, progress)
        start = time.perf_counter()
        pos = 0
        for _step in range(steps):
            idx = [order[(pos + j) % len(order)] for j in range(batch_size)]
            pos += batch_size
            x = train[idx].to(device)
            out = model(input_ids=x, labels=x if use_lm else None)
            if use_kd:
                with torch.no_grad():
                    t_logits = teacher(input_ids=x).logits
                kd = kd_loss(out.logits, t_logits, temperature)
                del t_logits
                loss = kd_weight * kd + (1.0 - kd_weight) * out.loss if use_lm else kd
                kd_losses.append(float(kd.detach()))
            else:
                loss = out.loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            del out
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if bar is not None:
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                bar.update(1)
        seconds = time.perf_counter() - start
        _round_factors(model, params, round_to)  # before "after": measure the model that will be stored
        model.eval()
        loss_after = mean_loss(model, held, batch_size)
        kl_after = mean_kl(model, teacher, held, batch_size) if teacher is not None else None
    finally:
        if bar is not None:
            bar.close()
        for p in params:
            p.grad = None  # the gradients are of no use after training; free them
        for p, flag in grad_flags:
            p.requires_grad_(flag)
        model.train(was_training)
    k = max(1, min(5, steps // 4))
    record: dict[str, Any] = {
        "mode": "factors",
        "objective": "kd" if use_kd and not use_lm else "kd+lm" if use_kd else "lm",
        "steps": steps,
        "lr": lr,
        "schedule": f"linear warmup {warm} steps, cosine to 0.1*lr",
        "seq_len": seq_len,
        "batch_size": batch_size,
        "seed": seed,
        "train_bias": train_bias,
        "trained_params": sum(p.numel() for p in params),
        "train_tokens": steps * batch_size * seq_len,
        "holdout_blocks": len(held),
        "loss_before": loss_before,
        "loss_after": loss_after,
        "train_loss_first": sum(losses[:k]) / k,
        "train_loss_last": sum(losses[-k:]) / k,
        "seconds": seconds,
        "device": str(device),
    }
    if len(mix) > 1:
        record["data_mix"] = mix
    if teacher is not None:
        record.update(kd_weight=kd_weight, temperature=temperature, kl_before=kl_before, kl_after=kl_after)
        if kd_losses:
            record.update(train_kd_first=sum(kd_losses[:k]) / k, train_kd_last=sum(kd_losses[-k:]) / k)
    return record


def _data_files(path: Path) -> list[Path]:
    return sorted(f for f in path.iterdir() if f.is_file() and f.suffix in TEXT_SUFFIXES) if path.is_dir() else [path]


def check_data_files(data_paths: Sequence[Path], eval_data: str | os.PathLike | None = None) -> None:
    """One-line :class:`HealError` when a file is trained on twice (also once directly and once inside a
    ``--data`` folder) or ``--eval_data`` holds a training file: either way held-out numbers would be on
    training text. Checked over the files the folders expand to, by resolved path, before anything loads."""
    given: dict[Path, Path] = {}  # resolved file -> the --data argument that includes it
    for d in data_paths:
        for f in _data_files(Path(d)):
            f = f.resolve()
            if f in given:
                how = f"--data {d} twice" if Path(given[f]) == Path(d) else f"--data {given[f]} and --data {d}"
                raise HealError(f"--data {f} is given twice ({how}); give each file once (sources are mixed evenly)")
            given[f] = Path(d)
    if eval_data is None:
        return
    for f in _data_files(Path(eval_data).expanduser().resolve()):
        if f.resolve() in given:
            raise HealError(f"--eval_data {f.resolve()} is also training text (--data {given[f.resolve()]}); give held-out text the healing does not read")


def check_seq_len(seq_len: int, config: Any) -> None:
    """One-line :class:`HealError` for a ``--seq_len`` the model cannot run, from its config (before the weights load).

    Learned absolute positions (GPT-2's ``n_positions``) have no embedding past the last one, so a longer block
    fails inside the model; others (rotary) run past theirs, with a warning (architectures.position_limit).
    """
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 2:
        raise HealError(f"--seq_len {seq_len} is invalid: expected an int >= 2")
    from .architectures import position_limit

    found = position_limit(config)
    if found is None or seq_len <= found[1]:
        return
    field, limit, table = found
    if not table:
        print(f"warning: --seq_len {seq_len} is beyond the model's {limit} positions ({field}): the model runs past them, on lengths it was not trained on", file=sys.stderr)
        return
    raise HealError(f"--seq_len {seq_len} is invalid: the model has {limit} learned positions ({field}); expected 2..{limit}")


def _float_dtypes(model: nn.Module) -> dict[str, torch.dtype]:
    """Each floating-point parameter's and buffer's dtype, by name (a tied tensor once)."""
    return {n: t.dtype for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_floating_point()}


def _cast_each(model: nn.Module, dtypes: Mapping[str, torch.dtype]) -> None:
    """Cast each parameter and buffer named in ``dtypes`` to its dtype in place (``.data``: tied tensors stay tied)."""
    with torch.no_grad():
        for n, t in [*model.named_parameters(), *model.named_buffers()]:
            if n in dtypes and t.dtype != dtypes[n]:
                t.data = t.data.to(dtypes[n])


def resolve_teacher(teacher: str, ckpt: Any) -> dict[str, Any]:
    """Where the teacher comes from, checked without loading weights: {"spec", "model_id", "revision", "compressed"}.

    ``teacher``: ``dense`` (the checkpoint's source model, manifest ``source.model_id``), or a
    dense model folder / hub ID, or another compressed checkpoint folder.
    """
    from transformers import AutoConfig

    from .checkpoint import CompressedCheckpoint

    valid = f"valid: {TEACHER_DENSE!r} (the checkpoint's source model) or a model folder/ID with the same tokenizer"
    source = ckpt.manifest.get("source") or {}
    revision, subfolder = None, None
    if teacher == TEACHER_DENSE:
        model_id = source.get("model_id")
        if not model_id:
            raise HealError(f"--teacher {TEACHER_DENSE}: the checkpoint records no source model (manifest source.model_id); give --teacher PATH")
        revision, subfolder = source.get("revision"), source.get("subfolder") or None
    else:
        model_id = teacher
    local = Path(str(model_id)).expanduser()
    if local.is_dir():
        model_id, revision = str(local.resolve()), None  # a folder has no revisions
    elif teacher != TEACHER_DENSE and (local.exists() or str(model_id).startswith((".", "/", "~"))):
        raise HealError(f"--teacher {teacher}: no such model folder; {valid}")
    try:
        compressed = CompressedCheckpoint.detect(model_id) is not None
    except Exception as exc:
        raise HealError(f"--teacher {teacher}: {exc}") from None
    try:
        kw = {k: v for k, v in (("revision", revision), ("subfolder", subfolder)) if v}
        tcfg = AutoConfig.from_pretrained(str(model_id), **kw)
    except Exception as exc:
        raise HealError(f"--teacher {teacher}: cannot load a model config from {model_id} ({type(exc).__name__}); {valid}") from None
    scfg = AutoConfig.from_pretrained(str(ckpt.path))
    if getattr(tcfg, "vocab_size", None) != getattr(scfg, "vocab_size", None):
        raise HealError(f"--teacher {teacher}: vocabulary of {getattr(tcfg, 'vocab_size', None)} tokens, the checkpoint's is {getattr(scfg, 'vocab_size', None)}; {valid}")
    info = {"spec": teacher, "model_id": str(model_id), "subfolder": subfolder, "revision": revision, "compressed": compressed, "weights_sha256": None}
    if not compressed:  # the files read: the subfolder's, as the source digest was taken
        info["weights_sha256"] = _weights_digest(f"{str(model_id).rstrip('/')}/{subfolder.strip('/')}" if subfolder else str(model_id), revision)
        recorded = source.get("weights_sha256")
        # "dense" promises the model the factors were computed from, not whatever the path now holds.
        if teacher == TEACHER_DENSE and recorded and info["weights_sha256"] and recorded != info["weights_sha256"]:
            raise HealError(f"--teacher {TEACHER_DENSE}: the weights at {model_id} differ from the ones the checkpoint was made from (sha256 mismatch); give --teacher PATH to distil from them anyway")
    return info


def _weights_digest(model_id: str, revision: str | None) -> str | None:
    from .checkpoint import _resolve_local_folder, source_digest

    folder = _resolve_local_folder(model_id, revision)
    try:
        return source_digest(folder) if folder is not None else None
    except OSError:
        return None


def load_teacher(info: dict[str, Any], device: str | torch.device) -> nn.Module:
    """The teacher described by :func:`resolve_teacher`, in fp32 and eval mode, no grad."""
    from transformers import AutoModelForCausalLM

    from .checkpoint import CompressedCheckpoint

    if info["compressed"]:
        model = CompressedCheckpoint.open(info["model_id"]).load_model(dtype=torch.float32, device=device)
    else:
        kw = {k: info[k] for k in ("revision", "subfolder") if info.get(k)}
        model = AutoModelForCausalLM.from_pretrained(info["model_id"], dtype=torch.float32, **kw).to(device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def heal_checkpoint(
    path: str | os.PathLike,
    out: str | os.PathLike,
    data: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    steps: int = 50,
    lr: float = 1e-4,
    seq_len: int = 128,
    batch_size: int = 4,
    seed: int = 0,
    device: str | None = None,
    eval_data: str | os.PathLike | None = None,
    eval_blocks: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    teacher: str | None = None,
    kd_weight: float | None = None,
    temperature: float | None = None,
) -> dict[str, Any]:
    """Heal the compressed checkpoint at ``path`` and save it to ``out``; returns the healing record.

    ``data``: one path or several (mixed evenly). ``teacher``: ``"dense"`` (the source model the
    checkpoint records) or a model path/ID, for distillation; see :func:`heal_model`.
    With ``eval_data`` (e.g. wikitext's wiki.test.raw, never trained on by default) the record
    also holds held-out perplexity before and after, on ``eval_blocks`` blocks (default 16).
    Every argument and all the text are checked, read and tokenized before the weights load.
    The saved tensors keep the dtypes the checkpoint stored (training runs in fp32).
    """
    from transformers import AutoConfig, AutoTokenizer

    from .calibration import tasks_scoring
    from .checkpoint import CompressedCheckpoint, check_output_folder, save_compressed

    check_heal_args(steps, lr, batch_size, teacher, kd_weight, temperature)
    if eval_blocks is not None:
        if eval_data is None:  # as --kd_weight without --teacher: refused rather than ignored
            raise HealError(f"--eval_blocks {eval_blocks} needs --eval_data (the held-out text it counts blocks of)")
        if not isinstance(eval_blocks, int) or isinstance(eval_blocks, bool) or eval_blocks < 1:
            raise HealError(f"--eval_blocks {eval_blocks} is invalid: expected an int >= 1")
    if Path(out).expanduser().resolve() == Path(path).expanduser().resolve():  # the save would replace what it reads
        raise HealError(f"--out {out} is the checkpoint being healed; choose a new folder (nothing was changed)")
    check_output_folder(out, overwrite)  # before the training it would otherwise throw away
    ckpt = CompressedCheckpoint.open(path)
    if data is None or (not isinstance(data, (str, os.PathLike)) and len(data) == 0):
        data_paths = [default_heal_data()]
    elif isinstance(data, (str, os.PathLike)):
        data_paths = [Path(data).expanduser().resolve()]
    else:
        data_paths = [Path(d).expanduser().resolve() for d in data]
    check_data_files(data_paths, eval_data)
    check_seq_len(seq_len, AutoConfig.from_pretrained(str(ckpt.path)))
    sources = [read_texts(d, "--data") for d in data_paths]
    eval_path = Path(eval_data).expanduser().resolve() if eval_data is not None else None
    eval_texts = read_texts(eval_path, "--eval_data") if eval_path is not None else None
    scored_by = {str(f): t for d in data_paths for f in _data_files(d) if (t := tasks_scoring(f))}
    for f, tasks in scored_by.items():  # allowed (e.g. boolq when boolq is not evaluated), but never evaluate those tasks after
        print(f"warning: --data {f} is the split that {', '.join(tasks)} scores; do not evaluate the healed model on it", file=sys.stderr)
    teacher_info = resolve_teacher(teacher, ckpt) if teacher is not None else None  # before any weights load
    # The tokenizer needs only the folder's tokenizer files: too little text is refused before the weights load.
    tokenizer = AutoTokenizer.from_pretrained(str(ckpt.path))
    blocks = mixed_blocks(tokenizer, sources, seq_len, steps * batch_size, HOLDOUT_BLOCKS, names=[str(d) for d in data_paths])
    eval_blocks_t = None
    if eval_texts is not None:
        n_eval = DEFAULT_EVAL_BLOCKS if eval_blocks is None else eval_blocks
        eval_blocks_t = token_blocks(tokenizer, eval_texts, seq_len, max_blocks=n_eval, what=f"--eval_data {eval_path}")
        if eval_blocks is not None and len(eval_blocks_t) < eval_blocks:  # rather than scoring fewer without a word
            raise HealError(f"--eval_blocks {eval_blocks} is invalid: --eval_data {eval_path} holds only {len(eval_blocks_t)} blocks of --seq_len {seq_len} tokens")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = ckpt.load_model(dtype=None, device=device)  # the stored dtypes, remembered for the save
    stored = _float_dtypes(model)
    _cast_each(model, {n: torch.float32 for n in stored})  # train in fp32 whatever is stored (exact upcast)
    ppl_before = perplexity(model, eval_blocks_t, batch_size) if eval_blocks_t is not None else None
    teacher_model = load_teacher(teacher_info, device) if teacher_info is not None else None
    record = heal_model(
        model, tokenizer, None, steps, lr=lr, seq_len=seq_len, batch_size=batch_size,
        seed=seed, progress=progress, teacher=teacher_model, kd_weight=kd_weight, temperature=temperature,
        blocks=blocks, round_to=stored,
    )
    del teacher_model
    record["data"] = str(data_paths[0]) if len(data_paths) == 1 else [str(d) for d in data_paths]
    record["data_split"] = data_paths[0].stem if data_paths[0].is_file() else data_paths[0].name
    if len(data_paths) > 1:
        record["data_split"] = [d.stem if d.is_file() else d.name for d in data_paths]
    # Audit trail for the no-leak rule: which local tasks score each file trained on.
    record["scored_by"] = scored_by
    if teacher_info is not None:
        record["teacher"] = teacher_info
    if eval_blocks_t is not None:
        record["eval_data"] = str(eval_path)
        record["eval_tokens"] = int(eval_blocks_t.numel())
        record["eval_ppl_before"] = ppl_before
        record["eval_ppl_after"] = perplexity(model, eval_blocks_t, batch_size)  # factors already rounded to the stored dtypes
    _cast_each(model, stored)  # save each tensor in the dtype the checkpoint had
    healing = list(ckpt.manifest.get("healing") or []) + [record]
    save_compressed(model, out, ckpt.manifest["decomposition"], tokenizer=tokenizer, source=ckpt.manifest.get("source"), healing=healing, overwrite=overwrite)
    return record
