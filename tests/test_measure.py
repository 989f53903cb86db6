"""Measurement: CPU latency, excluded probing calls, energy null with a reason, aggregation."""

from __future__ import annotations

import time

import torch

from lm_eval_lowrank.measure import Meter, aggregate


def test_cpu_latency_and_tokens():
    m = Meter.create("cpu", measure_energy=True)
    for _ in range(3):
        with m.measure("model_call", tokens=10):
            time.sleep(0.01)
    with m.excluded():
        with m.measure("model_call", tokens=1000):
            pass
    s = aggregate([m.summary()])
    lat = s["latency"]
    assert lat["timer"] == "perf_counter"
    assert lat["calls"] == 3 and lat["tokens"] == 30 and lat["excluded_calls"] == 1
    assert lat["total_seconds"] >= 0.03
    assert abs(lat["tokens_per_second"] - 30 / lat["total_seconds"]) < 1e-9


def test_energy_is_null_with_a_reason_without_a_gpu():
    if torch.cuda.is_available():  # pragma: no cover - CI has no GPU
        return
    s = aggregate([Meter.create("cpu").summary()])
    assert s["energy"]["available"] is False
    assert s["energy"]["total_joules"] is None and s["energy"]["joules_per_token"] is None
    assert isinstance(s["energy"]["reason"], str) and s["energy"]["reason"]


def test_peak_memory_on_cpu_is_process_rss():
    s = Meter.create("cpu", measure_energy=False).summary()
    assert s["memory"]["kind"] == "process_peak_rss" and s["memory"]["bytes"] > 10_000_000


def _summary(seconds, tokens, gpus):
    return {
        "latency": {"timer": "cuda_events", "total_seconds": seconds, "calls": 2, "tokens": tokens, "excluded_calls": 0, "by_kind": {"model_call": {"calls": 2, "seconds": seconds, "tokens": tokens}}},
        "energy": {"available": True, "method": "nvml_energy_counter", "per_gpu": gpus},
        "memory": {"kind": "cuda_max_memory_allocated", "bytes": 100},
    }


def test_aggregate_sums_over_processes_and_counts_a_shared_gpu_once():
    g0 = {"GPU-a": {"index": 0, "name": "x", "joules": 50.0, "idle_watts": 60.0, "joules_above_idle": 20.0}}
    g0_again = {"GPU-a": {"index": 0, "name": "x", "joules": 55.0, "idle_watts": 60.0, "joules_above_idle": 25.0}}
    g1 = {"GPU-b": {"index": 1, "name": "x", "joules": 40.0, "idle_watts": 60.0, "joules_above_idle": 10.0}}
    separate = aggregate([_summary(1.0, 100, g0), _summary(2.0, 100, g1)])
    assert separate["processes"] == 2
    assert separate["latency"]["tokens"] == 200 and separate["latency"]["total_seconds"] == 3.0
    assert separate["latency"]["tokens_per_second"] == 200 / 2.0  # parallel: the slowest process bounds it
    assert separate["energy"]["total_joules"] == 90.0
    assert separate["energy"]["joules_per_token"] == 90.0 / 200
    shared = aggregate([_summary(1.0, 100, g0), _summary(1.0, 100, g0_again)])
    assert shared["energy"]["total_joules"] == 55.0  # one GPU, counted once


def test_aggregate_unavailable_energy_keeps_the_reason():
    s = {"latency": {"timer": "perf_counter", "total_seconds": 1.0, "calls": 1, "tokens": 5, "excluded_calls": 0, "by_kind": {}}, "energy": {"available": False, "reason": "no CUDA GPU visible"}, "memory": {"kind": "process_peak_rss", "bytes": 1}}
    out = aggregate([s, dict(s)])
    assert out["energy"]["available"] is False and out["energy"]["reason"] == "no CUDA GPU visible"
    assert out["energy"]["total_joules"] is None


def test_tokens_can_be_set_after_the_call():
    m = Meter.create("cpu", measure_energy=False)
    with m.measure("generate", tokens=0) as rec:
        rec.tokens = 7  # e.g. generated tokens, known only after generation
    assert aggregate([m.summary()])["latency"]["by_kind"]["generate"]["tokens"] == 7


def test_meter_for_a_cuda_device_does_not_touch_cuda_when_none_is_usable():
    # HFLM sets device "cuda" for parallelize=True even where torch has no CUDA.
    m = Meter.create("cuda", measure_energy=False, model_devices=[torch.device("cpu")])
    assert not m.uses_cuda_events and m.timer == "perf_counter"
    with m.measure("model_call", tokens=4):
        pass
    assert m.summary()["latency"]["calls"] == 1


def test_a_model_sharded_over_gpus_is_timed_with_every_gpu_synchronised(monkeypatch):
    # parallelize=True: one stream's CUDA events cannot time work on several GPUs.
    synced: list[int] = []
    peaks = {0: 100, 1: 250, 2: 999}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda i=None: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda i=None: synced.append(i))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda i=None: peaks[i])
    m = Meter.create("cuda:0", measure_energy=False, model_devices=[torch.device("cuda:0"), torch.device("cuda:1")])
    assert m.sharded and not m.uses_cuda_events and m.timer == "perf_counter_cuda_synchronized"
    with m.measure("model_call", tokens=8):
        time.sleep(0.01)
    assert synced == [0, 1, 0, 1]  # before and after the call, on both GPUs the model uses
    s = m.summary()
    assert s["latency"]["timer"] == "perf_counter_cuda_synchronized" and s["latency"]["total_seconds"] >= 0.01
    # the peak of a sharded model is the sum over the GPUs it occupies (GPU 2 is not one of them)
    assert s["memory"]["bytes"] == 350 and s["memory"]["per_device"] == {"0": 100, "1": 250}


def test_offloaded_weights_give_a_clear_error(tiny_llama):
    import pytest

    from lm_eval_lowrank.api import compress_model
    from lm_eval_lowrank.spec import SpecError

    q = tiny_llama.model.layers[1].self_attn.q_proj
    q.weight = torch.nn.Parameter(torch.empty(q.weight.shape, device="meta"))  # as accelerate's offload leaves it
    with pytest.raises(SpecError, match=r"layers\.1\.self_attn\.q_proj\.weight is offloaded"):
        compress_model(tiny_llama, {"rank": 2, "layers": "2", "cache": False}, progress=False)
