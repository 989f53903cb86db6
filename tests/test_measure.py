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
