"""The Python API: one function that compresses a loaded model by a spec.

The harness (``hf-tucker``), the CLI (``decompose``, ``sweep``, ``search``) and user code
all go through :func:`compress_model`, which strings together, in order:
validation against the config, rank allocation (``budget=``), calibration statistics
(activation-aware methods), the decomposition cache, and the in-place replacement.
"""

from __future__ import annotations

import platform
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from .architectures import adapter_for_model, config_side_adapter
from .decompose import DecompositionReport, ProcessShard, decompose_model, refuse_decomposed
from .plan import make_plan
from .spec import GRADIENT_ONLY_METHODS, DecompositionSpec, SpecError


def as_spec(spec: DecompositionSpec | Mapping[str, Any] | None = None, **kwargs: Any) -> DecompositionSpec:
    if isinstance(spec, DecompositionSpec):
        return spec.with_(**kwargs) if kwargs else spec
    return DecompositionSpec.from_args({**(spec or {}), **kwargs})


def _quantization_method(config: Any) -> str | None:
    """The method a config says its weights are stored quantized with (None: dense). GGUF files are dequantized
    to floating point as they load, so they count as dense."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    method = qc.get("quant_method") if isinstance(qc, Mapping) else getattr(qc, "quant_method", None)
    method = str(getattr(method, "value", method) or "unknown")
    return None if method == "gguf" else method


def validate_against_config(spec: DecompositionSpec, config: Any) -> None:
    """Range checks that need only the config (layers past the end, ranks too large, tensors), and a refusal of
    quantized weights, which cannot be factorised as they are stored."""
    if spec.is_noop:
        return
    if (method := _quantization_method(config)) is not None:
        raise SpecError(
            f"pretrained is quantized (quant_method={method}): decomposition needs floating-point weights; "
            "give the unquantized model (the compressed one can be quantized after)"
        )
    adapter = config_side_adapter(config)
    if adapter is None:
        return  # transformers cannot build it empty (e.g. remote code): checked right after load
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the errors only: the plan's warnings come once, from the decomposition
        make_plan(spec, config, adapter=adapter)


_FLOAT8 = {getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz") if hasattr(torch, n)}


def _is_quantized(w: torch.Tensor) -> bool:
    """Stored in a form whose values are not the weight's: integers, float8 with a separate scale, or a quantized
    tensor class (bitsandbytes' Params4bit / Int8Params carry ``quant_state`` / ``SCB``)."""
    return not w.is_floating_point() or w.dtype in _FLOAT8 or hasattr(w, "quant_state") or hasattr(w, "SCB")


def _check_weights_in_memory(model: nn.Module, spec: DecompositionSpec, adapter: Any) -> None:
    """Offloaded weights (accelerate's disk/CPU offload leaves them on the meta device) and quantized ones cannot be
    factorised."""
    if spec.is_noop or not any(p.is_meta or _is_quantized(p) for p in model.parameters()):
        return  # the common case, without building a plan
    try:
        targets = make_plan(spec, model.config, adapter=adapter).targets
    except Exception:  # e.g. a budget before allocation: decompose_model reports plan errors itself
        return
    modules = dict(model.named_modules())
    for t in targets:
        if t.experts:  # a stacked expert projection: the path names the parameter itself
            owner, _, name = t.path.rpartition(".")
            w, where = getattr(modules[owner], name, None), t.path
        else:
            mod = modules[t.path]
            w, where = getattr(getattr(mod, "base_layer", mod), "weight", None), f"{t.path}.weight"
        if w is not None and not w.is_meta and _is_quantized(w):
            raise SpecError(
                f"{where} is stored quantized ({type(w).__name__} of {w.dtype}): decomposition needs floating-point "
                "weights; give the unquantized model (the compressed one can be quantized after)"
            )
        if w is not None and w.is_meta:
            raise SpecError(
                f"{where} is offloaded (meta device, e.g. parallelize=True/device_map without enough GPU "
                "memory): decomposition needs every targeted weight in memory; give the GPUs more room "
                "(max_memory_per_gpu), use fewer layers, or save a compressed checkpoint first "
                "(lm-eval-lowrank decompose, on the CPU) and evaluate that with parallelize=True"
            )


def compress_model(
    model: nn.Module,
    spec: DecompositionSpec | Mapping[str, Any],
    tokenizer: Any = None,
    model_id: str | None = None,
    progress: bool = True,
    shard: ProcessShard | None = None,
) -> DecompositionReport:
    """Decompose ``model`` in place according to ``spec`` and report what was done.

    ``shard``: data-parallel processes that hold the same model split the solves (every one must call this alike;
    see :class:`~lm_eval_lowrank.decompose.ProcessShard`)."""
    spec = as_spec(spec)
    if hasattr(model, "get_base_model"):  # a peft model (hf-tucker with peft=): the adapted linears' base layers
        model = model.get_base_model()
    adapter = adapter_for_model(model)
    _check_weights_in_memory(model, spec, adapter)
    refuse_decomposed(model, spec, adapter)
    ranks = None
    stats_provider = None
    from .methods import needs_calibration

    if spec.reads_calibration:
        if tokenizer is None:
            who = f"method={spec.method!r}" if needs_calibration(spec.method) else f"allocator={spec.allocator!r}"
            raise SpecError(f"{who} needs a tokenizer for its calibration data")
        from .calibration import build_stats_provider

        stats_provider = build_stats_provider(spec, model, tokenizer, adapter=adapter, model_id=model_id, shard=shard)
    if spec.budget is not None:
        from .allocation import allocate_ranks

        ranks = allocate_ranks(spec, model, adapter=adapter, stats_provider=stats_provider, tokenizer=tokenizer)
    from .assets import usable_cache_dir
    from .checkpoint import DecompositionCache, cache_info_disabled

    cache = None
    if not spec.cache:
        disabled = cache_info_disabled("cache=false")
    elif model_id is None:
        disabled = cache_info_disabled("no model id (a model object was passed)")
    elif (root := usable_cache_dir("decomp")) is None:
        disabled = cache_info_disabled("the cache folder cannot be used")
    else:
        cache = DecompositionCache.for_model(model, model_id, root)
        disabled = None if cache is not None else cache_info_disabled("source files not found locally")
    calibration = None
    if cache is not None and stats_provider is not None and needs_calibration(spec.method):
        from .calibration import peft_adapter_digest, tokens_digest

        calibration = tokens_digest(stats_provider.input_ids)  # the factors follow the tokens too
        if (adapters := peft_adapter_digest(model)) is not None:  # and the adapters the activations pass through
            calibration = f"{calibration}+{adapters}"
    # must precede store: it fingerprints the dense weights
    hit = cache.try_load(model, spec, adapter=adapter, ranks=ranks, calibration=calibration) if cache is not None else None
    if shard is not None and not all(shard.all_gather(hit is None)):
        shard = None  # some process found the cache entry: those that did not decompose on their own
        if stats_provider is not None and hit is None:
            stats_provider.unshare()
    if hit is not None:
        hit.allocation = getattr(ranks, "info", None)
        if stats_provider is not None:  # this run's data and no-leak check, not those stored with the factors
            hit.calibration = stats_provider.describe()
        return hit
    solve_stats = stats_provider  # what the method itself reads
    if stats_provider is not None and not needs_calibration(spec.method):
        solve_stats = None  # the statistics served the allocator only: a data-free method needs no second pass
    elif stats_provider is not None and spec.method in GRADIENT_ONLY_METHODS:
        solve_stats = stats_provider.fisher  # fwsvd reads the gradient pass, not the allocator's covariances
    try:
        report = decompose_model(model, spec, adapter=adapter, ranks=ranks, stats_provider=solve_stats, progress=progress, shard=shard)
    finally:
        if stats_provider is not None and hasattr(stats_provider, "release"):
            stats_provider.release()  # drop the held calibration hidden states
    if stats_provider is not None:
        report.calibration = stats_provider.describe()  # the allocator's data too
    report.allocation = getattr(ranks, "info", None)
    if cache is not None:
        cache.store(model, report)
    else:
        report.cache = disabled
    return report


def versions() -> dict[str, str | None]:
    import importlib.metadata as md

    out: dict[str, str | None] = {"python": platform.python_version()}
    for dist in ("lm-eval-lowrank", "torch", "transformers", "lm_eval", "peft", "accelerate"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = None
    return out
