"""``lm-eval-lowrank decompose`` and ``lm-eval-lowrank heal``: compressed checkpoints.

Typical use::

    lm-eval-lowrank decompose --model_args pretrained=PATH,rank=1,layers=3|15|28 --out ckpt/
    lm-eval-lowrank heal ckpt/ --steps 40 --out ckpt-healed/
    lm_eval --model hf-tucker --model_args pretrained=ckpt-healed/ --tasks ...
"""

from __future__ import annotations

import json
from typing import Any

import click

from .errors import InputError

# model_args besides the decomposition spec that decompose understands (passed to from_pretrained).
LOAD_KEYS = ("pretrained", "dtype", "revision", "device", "tokenizer", "subfolder")


@click.command("decompose")
@click.option("--model_args", "model_args", required=True, help="As for hf-tucker: pretrained=PATH_OR_ID,rank=N,layers=...[,method=...,dtype=...,revision=...].")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Folder to write the compressed checkpoint to.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it already holds a compressed checkpoint.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def decompose(model_args: str, out: str, overwrite: bool, quiet: bool) -> None:
    """Decompose a model and save a compressed checkpoint (factors, config, tokenizer, manifest)."""
    from ..spec import DecompositionSpec, SpecError, check_dtype_args, check_local_paths, check_model_folder, parse_model_args, split_model_args

    args = parse_model_args(model_args)
    ours, rest = split_model_args(args)
    spec = DecompositionSpec.from_args(ours)
    unknown = sorted(set(rest) - set(LOAD_KEYS))
    if unknown:
        raise SpecError(f"model_args: unknown key(s) {unknown} for decompose; valid: {', '.join(LOAD_KEYS)} and the decomposition arguments")
    check_dtype_args(rest)
    check_local_paths(rest)
    pretrained = rest.get("pretrained")
    if not pretrained:
        raise SpecError("model_args: pretrained is required, e.g. pretrained=PATH_OR_ID,rank=1,layers=3|15|28")
    if spec.is_noop:
        raise SpecError("model_args: give rank=N (or budget=F) to decompose; nothing would be compressed")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..api import compress_model, validate_against_config
    from ..checkpoint import CheckpointError, CompressedCheckpoint, check_output_folder

    try:
        already = CompressedCheckpoint.detect(str(pretrained)) is not None
    except CheckpointError:
        already = True
    if already:
        raise SpecError(f"pretrained={pretrained!r} is already a compressed checkpoint; decompose a dense model")
    check_model_folder(pretrained, rest)
    try:
        check_output_folder(out, overwrite)  # before the decomposition it would otherwise throw away
    except CheckpointError as exc:
        raise InputError(str(exc)) from None
    check_device(rest.get("device"), "device")
    revision = rest.get("revision")
    kw: dict[str, Any] = {"dtype": rest.get("dtype") or "auto"}
    if revision:
        kw["revision"] = str(revision)
    if rest.get("subfolder"):
        kw["subfolder"] = str(rest["subfolder"])
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(pretrained), **{k: v for k, v in kw.items() if k != "dtype"})
    except (OSError, ValueError) as exc:  # transformers' several-line messages, as one line naming the argument
        where = f"pretrained={pretrained!r}" + (f", subfolder={kw['subfolder']!r}" if "subfolder" in kw else "")
        raise SpecError(f"{where}: no model config there ({str(exc).strip().splitlines()[0]})") from None
    validate_against_config(spec, config)  # range errors before the weights load
    from ..calibration import check_calibration_args, check_calibration_windows

    check_calibration_args(spec, config)  # calib names, data files, the no-leak rule, calib_len
    device = rest.get("device")
    shard = _join_processes(str(device) if device else None)
    if shard is not None and device and str(device).startswith("cuda"):
        device = f"cuda:{_local_gpu()}"  # one GPU per process
    # as HFLM builds it: the model's revision and subfolder, also for a tokenizer= given by name
    tok_kw = {k: kw[k] for k in ("revision", "subfolder") if k in kw}
    tokenizer = AutoTokenizer.from_pretrained(str(rest.get("tokenizer") or pretrained), **tok_kw)
    check_calibration_windows(spec, tokenizer)  # calib_n x calib_len against the sources, before the weights load
    model = AutoModelForCausalLM.from_pretrained(str(pretrained), **kw)
    if device:
        model.to(str(device))
    first = shard is None or shard.rank == 0
    model_id = f"{str(pretrained).rstrip('/')}/{kw['subfolder'].strip('/')}" if "subfolder" in kw else str(pretrained)  # the files read
    report = compress_model(model, spec, tokenizer=tokenizer, model_id=model_id, progress=not quiet and first, shard=shard)
    try:
        if first:  # every process holds the same factors: the first one writes them
            _save(model, config, tokenizer, report, str(pretrained), kw.get("subfolder"), model_id, revision, out, overwrite)
    finally:  # the others wait for it, also when it fails
        _leave(shard)


def _save(
    model: Any, config: Any, tokenizer: Any, report: Any, pretrained: str, subfolder: str | None, files: str, revision: Any, out: str, overwrite: bool
) -> None:
    """``files``: the folder or id the weights were read from (``pretrained/subfolder`` under ``subfolder=``)."""
    from ..checkpoint import CheckpointError, CompressedCheckpoint, save_compressed

    source = {
        "model_id": pretrained,
        **({"subfolder": subfolder} if subfolder else {}),
        "revision": str(revision) if revision else getattr(config, "_commit_hash", None),
        "dtype": str(model.dtype).replace("torch.", ""),
        "weights_sha256": _source_digest(files, model),
    }
    try:
        path = save_compressed(model, out, report, tokenizer=tokenizer, source=source, overwrite=overwrite)
    except CheckpointError as exc:
        raise InputError(str(exc)) from None
    ckpt = CompressedCheckpoint.open(path)
    m = ckpt.manifest
    cache = report.cache or {}
    shared = f", solves shared by {report.shared_solves['processes']} processes" if report.shared_solves else ""
    click.echo(
        f"saved {path}: {len(m['modules'])} modules, params {m['params']['before']} -> {m['params']['after']} "
        f"({100 * (m['params']['reduction'] or 0):.2f}% fewer), weights {ckpt.weight_bytes() / 2**20:.1f} MiB, "
        f"cache {'hit' if cache.get('hit') else 'miss' if cache.get('enabled') else 'off'}{shared}"
    )


def _local_gpu() -> int:
    """This process's GPU: its local rank, wrapping round when the node has fewer GPUs than processes."""
    import os

    import torch

    return int(os.environ.get("LOCAL_RANK", "0")) % max(1, torch.cuda.device_count())


def check_device(value: Any, arg: str) -> None:
    """A one-line SpecError for a device torch cannot parse, or CUDA where this torch has none: before any load."""
    if value in (None, ""):
        return
    import torch

    from ..spec import SpecError

    try:
        kind = torch.device(str(value)).type
    except (RuntimeError, ValueError):
        raise SpecError(f"{arg}={value!r} is invalid: expected cpu, cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise SpecError(f"{arg}={value!r} is invalid: this torch ({torch.__version__}) has no usable CUDA; use cpu")


def _join_processes(device: str | None) -> Any:
    """Under torchrun or accelerate launch (WORLD_SIZE > 1), join the processes so they share the decomposition
    (lm_eval_lowrank.decompose.ProcessShard). None in a lone process. The group is gloo even for GPUs: the factors
    travel on the CPU, and NCCL would refuse two processes on one GPU."""
    import os

    import torch
    import torch.distributed as dist

    from ..decompose import ProcessShard

    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return None
    if not dist.is_initialized():
        if device and device.startswith("cuda") and torch.cuda.is_available():
            torch.cuda.set_device(_local_gpu())
        dist.init_process_group(backend="gloo")
    return ProcessShard.create()


def _leave(shard: Any) -> None:
    """Wait until the first process has written the checkpoint, then leave the process group."""
    if shard is None:
        return
    import torch.distributed as dist

    shard.all_gather(None)  # a barrier on the shard's gloo group, whatever the default backend
    dist.destroy_process_group()


def _source_digest(model_id: str, model: Any) -> str | None:
    from ..checkpoint import _resolve_local_folder, source_digest

    folder = _resolve_local_folder(model_id, getattr(model.config, "_commit_hash", None))
    try:
        return source_digest(folder) if folder is not None else None
    except OSError:
        return None


@click.command("heal")
@click.argument("ckpt", type=click.Path(file_okay=False))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Folder for the healed checkpoint.")
@click.option(
    "--data", "data", multiple=True, type=click.Path(),
    help="Training text: .jsonl/.txt/.raw file or folder; give it several times to mix sources evenly, each file once "
    "(default: shared data gsm8k/train.jsonl, the only train split). Never a split an evaluated task scores.",
)
@click.option("--steps", "steps", default=50, show_default=True, type=click.IntRange(min=1), help="Optimizer steps.")
@click.option("--lr", "lr", default=1e-4, show_default=True, type=click.FloatRange(min=0, min_open=True), help="Peak AdamW learning rate (positive and finite).")
@click.option("--seq_len", "seq_len", default=128, show_default=True, type=click.IntRange(min=2), help="Tokens per training block (at most the model's learned positions, e.g. GPT-2's n_positions).")
@click.option("--batch_size", "batch_size", default=4, show_default=True, type=click.IntRange(min=1), help="Blocks per step.")
@click.option("--seed", "seed", default=0, show_default=True, type=int)
@click.option("--device", "device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available).")
@click.option("--eval_data", "eval_data", default=None, type=click.Path(), help="Held-out text for perplexity before/after (e.g. wikitext/wiki.test.raw); not a --data file.")
@click.option("--eval_blocks", "eval_blocks", default=None, type=click.IntRange(min=1), help="With --eval_data: blocks of --seq_len tokens of it to score (default 16).")
@click.option("--teacher", "teacher", default=None, help="Distil from a teacher: 'dense' (the checkpoint's source model) or a model folder/ID with the same tokenizer.")
@click.option("--kd_weight", "kd_weight", default=None, type=float, help="With --teacher: weight of the KD loss in [0, 1]; the rest is the LM loss (default 1: KD only).")
@click.option("--temperature", "temperature", default=None, type=float, help="With --teacher: softmax temperature of the KD loss (default 1).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it already holds a compressed checkpoint.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def heal(
    ckpt: str, out: str, data: tuple[str, ...], steps: int, lr: float, seq_len: int, batch_size: int, seed: int, device: str | None,
    eval_data: str | None, eval_blocks: int | None, teacher: str | None, kd_weight: float | None, temperature: float | None, overwrite: bool, quiet: bool,
) -> None:
    """Train the low-rank factors of CKPT for a few steps (LM loss, or distillation from --teacher) and save to --out."""
    from ..checkpoint import CheckpointError
    from ..heal import HealError, heal_checkpoint
    from ..tasks import DataDirError

    from ..spec import SpecError

    try:
        check_device(device, "--device")
    except SpecError as exc:
        raise InputError(str(exc)) from None
    try:
        record = heal_checkpoint(
            ckpt, out, data=list(data) or None, steps=steps, lr=lr, seq_len=seq_len, batch_size=batch_size, seed=seed,
            device=device, eval_data=eval_data, eval_blocks=eval_blocks, overwrite=overwrite, progress=not quiet,
            teacher=teacher, kd_weight=kd_weight, temperature=temperature,
        )
    except (CheckpointError, HealError, DataDirError) as exc:
        raise InputError(str(exc)) from None
    keys = ("loss_before", "loss_after", "kl_before", "kl_after", "eval_ppl_before", "eval_ppl_after", "seconds")
    click.echo(f"saved {out}: " + json.dumps({k: round(record[k], 4) for k in keys if k in record}))
