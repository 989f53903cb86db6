"""Measurement: CPU latency, excluded probing calls, energy (RAPL on a fake powercap tree, null with a reason), aggregation."""

from __future__ import annotations

import os
import time

import pytest
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


def test_energy_is_null_with_a_reason_without_a_gpu_or_rapl(tmp_path, monkeypatch):
    from lm_eval_lowrank import measure

    monkeypatch.setattr(measure, "RAPL_ROOT", tmp_path)  # a host whose RAPL counters are readable would fill it
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
    small = _summary(1.0, 100, g1)
    small["memory"] = {"kind": "cuda_max_memory_allocated", "bytes": 30}
    memory = aggregate([_summary(1.0, 100, g0), small])["memory"]
    assert (memory["bytes"], memory["total_bytes"], memory["per_process_bytes"]) == (100, 130, [100, 30])


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


# -- RAPL (CPU energy), on a fake powercap tree: this machine exposes none ------------------


def _zone(root, name, label, uj, range_uj=1_000_000_000):
    d = root / name
    d.mkdir()
    (d / "name").write_text(label + "\n")
    (d / "energy_uj").write_text(f"{uj}\n")
    (d / "max_energy_range_uj").write_text(f"{range_uj}\n")
    return d


def _fake_powercap(tmp_path):
    root = tmp_path / "powercap"
    root.mkdir()
    pkg = _zone(root, "intel-rapl:0", "package-0", 5_000_000)
    _zone(root, "intel-rapl:0:0", "core", 1_000)  # inside the package: not added
    dram = _zone(root, "intel-rapl:0:1", "dram", 7_000)
    _zone(root, "intel-rapl:1", "psys", 9_000)  # the whole platform, packages included: not added
    return root, pkg, dram


def _set(zone, uj):
    # Replaced whole, like a sysfs read that never sees a half-written value: write_text truncates first, and a
    # reader thread could read the empty file in between (it did, once in a CI run).
    tmp = zone / "energy_uj.tmp"
    tmp.write_text(f"{uj}\n")
    os.replace(tmp, zone / "energy_uj")


def test_rapl_zones_are_the_packages_and_their_dram_without_overlap(tmp_path):
    from lm_eval_lowrank.measure import rapl_zones

    root, _, _ = _fake_powercap(tmp_path)
    zones, reason = rapl_zones(root)
    assert reason is None
    assert [(z.zone, z.name) for z in zones] == [("intel-rapl:0", "package-0"), ("intel-rapl:0:1", "dram")]
    empty = tmp_path / "none"
    empty.mkdir()
    zones, reason = rapl_zones(empty)
    assert zones == [] and "no RAPL counters" in reason


def test_rapl_counter_wraps_are_folded_in(tmp_path):
    from lm_eval_lowrank.measure import rapl_zones

    root, pkg, _ = _fake_powercap(tmp_path)
    zone = rapl_zones(root)[0][0]
    t0 = zone.energy_j()
    _set(pkg, 999_000_000)  # +994 J
    assert zone.energy_j() - t0 == 994.0
    _set(pkg, 2_000_000)  # wrapped at 1000 J: +1 J to the top, +2 J after
    assert zone.energy_j() - t0 == 997.0


def test_unreadable_rapl_counters_give_a_reason(tmp_path, monkeypatch):
    from lm_eval_lowrank import measure

    root, pkg, _ = _fake_powercap(tmp_path)
    real = measure.Path.read_text

    def denied(self, *a, **k):
        if self.name == "energy_uj":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(measure.Path, "read_text", denied)
    zones, reason = measure.rapl_zones(root)
    assert zones == [] and "not readable" in reason and "energy_uj" in reason


def test_a_cpu_run_reports_rapl_energy_per_zone_and_above_idle(tmp_path, monkeypatch):
    from lm_eval_lowrank import measure

    root, pkg, dram = _fake_powercap(tmp_path)
    monkeypatch.setattr(measure, "RAPL_ROOT", root)
    m = Meter.create("cpu", idle_seconds=0.0)
    assert m.energy.available and m.energy.method == "rapl_energy_counter"
    m.energy.idle_power_w = {z.uuid: 0.0 for z in m.energy.sources}
    with m.measure("model_call", tokens=100):
        _set(pkg, 5_000_000 + 30_000_000)  # +30 J
        _set(dram, 7_000 + 2_000_000)  # +2 J
    s = aggregate([m.summary()])
    e = s["energy"]
    m.energy.close()
    assert e["available"] and e["method"] == "rapl_energy_counter" and "per_gpu" not in e
    assert sorted(v["name"] for v in e["per_rapl_zone"].values()) == ["dram", "package-0"]
    assert e["total_joules"] == 32.0 and e["joules_per_token"] == 0.32
    assert e["total_joules_above_idle"] == 32.0


def test_rapl_idle_power_is_a_counter_difference(tmp_path, monkeypatch):
    import threading

    from lm_eval_lowrank import measure

    root, pkg, _ = _fake_powercap(tmp_path)
    monkeypatch.setattr(measure, "RAPL_ROOT", root)
    meter = measure.EnergyMeter(idle_seconds=0.3, sample_interval=0.01, device="cpu")
    # the package draws 1 J per 10 ms (100 W) while idle; written from another thread
    stop = threading.Event()

    def burn():
        uj = 5_000_000
        while not stop.wait(0.01):
            uj += 1_000_000
            _set(pkg, uj)

    t = threading.Thread(target=burn)
    t.start()
    try:
        meter.measure_idle()
    finally:
        stop.set()
        t.join()
    pkg_uuid = meter.sources[0].uuid
    assert 40.0 < meter.idle_power_w[pkg_uuid] <= 110.0  # 100 W, less the writer's oversleeping


def test_processes_on_one_host_count_its_rapl_zones_once():
    zone = {"host:intel-rapl:0": {"zone": "intel-rapl:0", "name": "package-0", "joules": 30.0, "idle_watts": None, "joules_above_idle": None}}
    again = {"host:intel-rapl:0": {**zone["host:intel-rapl:0"], "joules": 31.0}}

    def summary(parts):
        s = _summary(1.0, 50, {})
        s["energy"] = {"available": True, "method": "rapl_energy_counter", "per_rapl_zone": parts}
        return s

    out = aggregate([summary(zone), summary(again)])
    assert out["energy"]["per_rapl_zone"]["host:intel-rapl:0"]["joules"] == 31.0
    assert out["energy"]["total_joules"] == 31.0 and out["energy"]["joules_per_token"] == 31.0 / 100


class _FakeNvml:
    """pynvml's calls that EnergyMeter makes, for two GPUs: GPU-a with an energy counter, GPU-b without."""

    def __init__(self):
        self.mj = {0: 1_000_000, 1: 0}
        self.watts = {0: 100.0, 1: 50.0}

    def nvmlInit(self):
        pass

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetUUID(self, h):
        return b"GPU-a" if h == 0 else "GPU-b"

    def nvmlDeviceGetName(self, h):
        return "Fake H100"

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        if h == 1:
            raise RuntimeError("not supported")
        return self.mj[h]

    def nvmlDeviceGetPowerUsage(self, h):
        return int(self.watts[h] * 1000)


def test_sampled_power_covers_the_whole_span_the_idle_subtraction_covers(monkeypatch):
    """Power sampled every interval covered only up to the last sample, and began when the thread first ran, while
    the idle power is subtracted over the whole span: the energy above idle came out low. At a constant power equal
    to idle it must be ~0, and the joules ~ power x seconds, even with no sample between start and read."""
    import sys

    from lm_eval_lowrank.measure import EnergyMeter

    fake = _FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    meter = EnergyMeter(idle_seconds=0.05, sample_interval=5.0, device="cuda:0")  # no sample before read
    meter.measure_idle()
    meter.start()
    time.sleep(0.2)
    e = meter.read()
    meter.close()
    b = e["per_gpu"]["GPU-b"]  # 50 W, no counter
    assert b["joules"] == pytest.approx(50.0 * e["seconds"], rel=1e-3)
    assert b["joules_above_idle"] == pytest.approx(0.0, abs=50.0 * 1e-3)


def test_nvml_counters_and_power_sampling_on_a_fake_driver(monkeypatch, tmp_path):
    import sys

    from lm_eval_lowrank import measure
    from lm_eval_lowrank.measure import EnergyMeter

    fake = _FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    meter = EnergyMeter(idle_seconds=0.05, sample_interval=0.01, device="cuda:0")
    assert meter.available and meter.method == "nvml_power_sampling"  # GPU-b has no counter
    meter.measure_idle()
    assert meter.idle_power_w == {"GPU-a": 100.0, "GPU-b": 50.0}
    meter.start()
    fake.mj[0] += 30_000  # 30 J on GPU-a's counter
    time.sleep(0.2)
    e = meter.read()
    meter.close()
    assert set(e["per_gpu"]) == {"GPU-a", "GPU-b"} and e["per_gpu"]["GPU-a"]["name"] == "Fake H100"
    assert e["per_gpu"]["GPU-a"]["joules"] == 30.0
    assert 5.0 <= e["per_gpu"]["GPU-b"]["joules"] <= 50.0 * e["seconds"] + 1e-9  # 50 W integrated over ~0.2 s
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-a")
    only_a = EnergyMeter(idle_seconds=0, device="cuda")
    assert [g.uuid for g in only_a.sources] == ["GPU-a"] and only_a.method == "nvml_energy_counter"
    monkeypatch.setattr(measure, "RAPL_ROOT", tmp_path)
    on_cpu = EnergyMeter(idle_seconds=0, device="cpu")  # the model is not on the GPUs: they are not measured
    assert on_cpu.sources == [] and on_cpu.reason.startswith("no GPU in use, and no RAPL counters")


def test_only_the_gpus_the_model_occupies_are_measured(monkeypatch):
    """On a machine with several GPUs, a model on one of them is charged for that one, found by UUID."""
    import sys
    from types import SimpleNamespace

    from lm_eval_lowrank.measure import EnergyMeter

    monkeypatch.setitem(sys.modules, "pynvml", _FakeNvml())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    # CUDA orders devices fastest first, NVML by PCI bus: here CUDA device 0 is NVML's second GPU
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(uuid=["b", "a"][i]))
    assert [g.uuid for g in EnergyMeter(idle_seconds=0, device="cuda:0", cuda_devices=[0]).sources] == ["GPU-b"]
    both = EnergyMeter(idle_seconds=0, device="cuda:0", cuda_devices=[1, 0])  # parallelize=True over both
    assert sorted(g.uuid for g in both.sources) == ["GPU-a", "GPU-b"]

    def no_uuid(i):
        raise RuntimeError("no uuid in this torch")

    monkeypatch.setattr(torch.cuda, "get_device_properties", no_uuid)  # then the position among the visible GPUs
    assert [g.uuid for g in EnergyMeter(idle_seconds=0, device="cuda:1", cuda_devices=[1]).sources] == ["GPU-b"]
    gone = EnergyMeter(idle_seconds=0, device="cuda:5", cuda_devices=[5])
    assert not gone.available and "none of the GPUs in use" in gone.reason


def test_a_sharded_model_is_charged_for_every_gpu_it_occupies(monkeypatch):
    """parallelize=True: the meter takes the GPUs from where the parameters live."""
    import sys
    from types import SimpleNamespace

    monkeypatch.setitem(sys.modules, "pynvml", _FakeNvml())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda i=None: None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(uuid=["a", "b"][i]))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    one = Meter.create("cuda:0", idle_seconds=0, model_devices=[torch.device("cuda:0")])
    assert [g.uuid for g in one.energy.sources] == ["GPU-a"]
    sharded = Meter.create("cuda:0", idle_seconds=0, model_devices=[torch.device("cuda:0"), torch.device("cuda:1"), torch.device("cpu")])
    assert [g.uuid for g in sharded.energy.sources] == ["GPU-a", "GPU-b"]


def test_env_says_what_a_run_here_will_measure(tmp_path, monkeypatch):
    """`lm-eval-lowrank env`: registration, and the energy counters a CPU run would read (a fake RAPL tree)."""
    import json

    from click.testing import CliRunner

    from lm_eval_lowrank import measure
    from lm_eval_lowrank.cli import cli

    monkeypatch.setattr(measure, "RAPL_ROOT", tmp_path / "none")
    r = CliRunner().invoke(cli, ["env"])
    assert r.exit_code == 0, r.output
    assert "hf and hf-tucker both resolve" in r.output
    assert "energy, model on CPU  n/a: no GPU in use, and no RAPL counters" in r.output
    _fake_powercap(tmp_path)
    monkeypatch.setattr(measure, "RAPL_ROOT", tmp_path / "powercap")
    info = json.loads(CliRunner().invoke(cli, ["env", "--json"]).output)
    assert info["registry"]["ok"] and info["registry"]["hf-tucker"].endswith("HFTuckerLM")
    cpu = info["cpu"]["energy"]
    assert cpu["available"] and cpu["method"] == "rapl_energy_counter"
    assert sorted(c["name"] for c in cpu["counters"].values()) == ["dram", "package-0"]
    # The methods with their own options, which read calibration data, and the architectures with an adapter.
    from lm_eval_lowrank.methods import get_method, needs_calibration

    assert info["methods"]["asvd"] == {"calibrated": True, "options": ["asvd_alpha", "asvd_stat"]}
    for name, m in info["methods"].items():
        assert get_method(name) and m["calibrated"] == needs_calibration(name)
    assert {"llama", "qwen2", "gpt2"} <= set(info["architectures"])
    assert "methods               data-free: tucker; calibrated (calib=): " in r.output
    from lm_eval_lowrank.methods.tucker import gram_solves_release_gil

    assert ("without the GIL" in info["solvers"]["cpu"]) == gram_solves_release_gil()


def test_every_call_is_kept_in_order_with_percentiles_and_processes_concatenate():
    from lm_eval_lowrank.measure import Meter, aggregate, percentiles

    m = Meter.create("cpu", measure_energy=False)
    for tokens, pause in ((30, 0.002), (10, 0.02), (20, 0.0)):
        with m.measure("model_call", tokens):
            time.sleep(pause)
    lat = m.summary()["latency"]
    assert lat["per_call_tokens"] == [30, 10, 20]
    assert len(lat["per_call_seconds"]) == 3 and lat["per_call_seconds"][1] >= 0.02 > lat["per_call_seconds"][0]
    assert abs(sum(lat["per_call_seconds"]) - lat["total_seconds"]) < 1e-6
    p = lat["seconds_per_batch_percentiles"]
    assert p["max"] == max(lat["per_call_seconds"]) and p["p50"] == sorted(lat["per_call_seconds"])[1]
    # Linear interpolation between order statistics, as numpy's default.
    assert percentiles([5.0, 1.0, 4.0, 2.0, 3.0]) == pytest.approx({"p50": 3.0, "p90": 4.6, "p99": 4.96, "max": 5.0})
    assert percentiles([]) is None
    two = aggregate([m.summary(), m.summary()])["latency"]
    assert two["per_call_tokens"] == [30, 10, 20, 30, 10, 20] and two["seconds_per_batch_percentiles"]["max"] == p["max"]


def test_cuda_events_time_the_stream_of_the_models_gpu_not_the_current_one(monkeypatch):
    """HFLM puts a model on cuda:1 without making cuda:1 the current device: events recorded on the current
    device's stream would time cuda:0's idle stream. Fake torch.cuda with torch's semantics: record() without a
    stream takes the current device's."""
    current = 0
    recorded, waited = [], []

    class FakeEvent:
        def __init__(self, enable_timing=False):
            self.stream = None

        def record(self, stream=None):
            self.stream = f"stream of cuda:{current}" if stream is None else stream
            recorded.append(self.stream)

        def synchronize(self):
            waited.append(self.stream)

        def elapsed_time(self, end):
            return 250.0

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: f"stream of cuda:{torch.device(device).index if device is not None else current}")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(f"device {device}"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda i=None: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda i=None: 7)
    m = Meter.create("cuda:1", measure_energy=False, model_devices=[torch.device("cuda:1")])
    assert m.timer == "cuda_events"
    for _ in range(3):
        with m.measure("model_call", tokens=4):
            pass
    s = m.summary()
    assert recorded == ["stream of cuda:1"] * 6
    assert waited == ["stream of cuda:1"]  # the last event of that stream, once: the earlier ones are done then
    assert s["latency"]["per_call_seconds"] == [0.25] * 3 and s["memory"]["per_device"] == {"1": 7}


def test_the_energy_of_a_gpu_is_found_by_uuid_among_every_gpu_nvml_numbers(monkeypatch):
    """CUDA_VISIBLE_DEVICES=1 names CUDA's second GPU (fastest first), which here is NVML's first (PCI order):
    the UUID is searched among all of NVML's GPUs, not only those at NVML's positions named in the variable."""
    import sys
    from types import SimpleNamespace

    from lm_eval_lowrank.measure import EnergyMeter

    monkeypatch.setitem(sys.modules, "pynvml", _FakeNvml())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(uuid=["a"][i]))
    assert [g.uuid for g in EnergyMeter(idle_seconds=0, device="cuda:0", cuda_devices=[0]).sources] == ["GPU-a"]


def test_an_energy_counter_that_fails_mid_run_ends_the_energy_figures_not_the_evaluation(monkeypatch):
    import sys

    from lm_eval_lowrank.measure import EnergyMeter

    class LostGPU(_FakeNvml):
        lost_at = None  # the read number from which the counter raises

        def __init__(self):
            super().__init__()
            self.reads = 0

        def nvmlDeviceGetTotalEnergyConsumption(self, h):
            if h == 0:
                self.reads += 1
                if self.lost_at is not None and self.reads >= self.lost_at:
                    raise RuntimeError("NVML_ERROR_GPU_IS_LOST")
            return super().nvmlDeviceGetTotalEnergyConsumption(h)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-a")
    for lost_at, when in ((2, "at the first measured call"), (3, "at the end")):  # read 1 is the counter probe
        fake = LostGPU()
        fake.lost_at = lost_at
        monkeypatch.setitem(sys.modules, "pynvml", fake)
        meter = EnergyMeter(idle_seconds=0, device="cuda:0")
        assert meter.available
        meter.start()
        e = meter.read()
        meter.close()
        assert e == {"available": False, "reason": f"energy counter failed {when}: RuntimeError: NVML_ERROR_GPU_IS_LOST"}
        assert meter.read() == e  # and stays so



def test_a_rapl_counter_that_vanishes_while_idle_power_is_measured_ends_the_energy_figures(tmp_path, monkeypatch):
    from lm_eval_lowrank import measure

    root, pkg, _ = _fake_powercap(tmp_path)
    monkeypatch.setattr(measure, "RAPL_ROOT", root)
    m = Meter.create("cpu", idle_seconds=0.02)
    assert m.energy.available
    (pkg / "energy_uj").unlink()
    m.energy.measure_idle()
    with m.measure("model_call", tokens=10):
        pass
    e = aggregate([m.summary()])["energy"]
    m.energy.close()
    assert e["available"] is False and e["reason"].startswith("energy counter failed measuring idle power: FileNotFoundError")


def test_aggregate_does_not_pass_a_partial_energy_sum_off_as_the_total():
    g0 = {"GPU-a": {"index": 0, "name": "x", "joules": 50.0, "idle_watts": None, "joules_above_idle": None}}
    lost = _summary(1.0, 100, {})
    lost["energy"] = {"available": False, "reason": "energy counter failed at the end: RuntimeError: lost"}
    out = aggregate([_summary(1.0, 100, g0), lost])
    assert out["energy"]["available"] is False and out["energy"]["total_joules"] is None
    assert out["energy"]["reason"] == "energy read by 1 of 2 processes; one that ran without it: energy counter failed at the end: RuntimeError: lost"
    idle = _summary(0.0, 0, {})  # a process given no requests measured nothing, and spent nothing on them
    idle["latency"]["calls"] = 0
    idle["energy"] = {"available": False, "reason": "no measured forward ran"}
    out = aggregate([_summary(1.0, 100, g0), idle])
    assert out["energy"]["available"] is True and out["energy"]["total_joules"] == 50.0


def test_excluded_batch_size_probes_leave_out_their_energy_and_memory_peak(monkeypatch):
    """batch_size=auto probes the batch size again for each later request type, after the energy meter started:
    latency left those forwards out, energy counted them (a probe of 5 x 8 x 1024 tokens was 85 % of the joules)."""
    import sys

    from lm_eval_lowrank.measure import EnergyMeter, Meter

    fake = _FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    energy = EnergyMeter(idle_seconds=0, device="cuda:0")
    # CUDA's allocator peak, faked: the probe's peak (500) is not the evaluation's
    mem = {"now": 40, "peak": 40}
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda i=0: mem["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda i=0: mem.update(peak=mem["now"]))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    meter = Meter(device=torch.device("cuda:0"), energy=energy, cuda_devices=[0])
    energy.start()
    fake.mj[0] += 30_000  # 30 J measured
    mem["peak"] = 100
    with meter.excluded():
        fake.mj[0] += 1_000_000  # 1000 J of probing
        mem["peak"] = 500
    fake.mj[0] += 5_000
    mem["peak"] = max(mem["peak"], 70)
    e = energy.read()
    energy.close()
    assert e["per_gpu"]["GPU-a"]["joules"] == pytest.approx(35.0)
    assert meter.peak_memory()["bytes"] == 100  # the peak before the probe, not the probe's


def test_an_energy_sampler_stops_when_its_meter_is_dropped(tmp_path, monkeypatch):
    """Each meter's sampler thread polled for the life of the process: in-process sweeps piled them up."""
    import gc
    import threading
    import time

    from lm_eval_lowrank import measure

    _zone(tmp_path, "intel-rapl:0", "package-0", 0)
    monkeypatch.setattr(measure, "RAPL_ROOT", tmp_path)
    monkeypatch.setattr(measure, "RAPL_POLL_SECONDS", 0.02)
    before = threading.active_count()
    for _ in range(3):
        meter = measure.Meter.create("cpu", idle_seconds=0)
        with meter.measure("model_call", tokens=1):
            pass
        assert meter.summary()["energy"]["available"] and threading.active_count() > before
        del meter
        gc.collect()
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert threading.active_count() == before


def test_generate_calls_pair_by_their_inputs_and_say_when_lengths_differ():
    """A generate call's tokens are the new tokens, which differ between two models: pairing on them refused two
    runs of one generation task with 'the runs timed different batches'."""
    from lm_eval_lowrank.latency_stats import LatencyRatio, latency_ratio

    inputs = [40, 36, 30, 48, 44, 40, 38, 32, 30, 28]
    dense = {"per_call_seconds": [1.0] * 10, "per_call_tokens": [8] * 10, "per_call_input_tokens": inputs}
    low = {"per_call_seconds": [0.9] * 10, "per_call_tokens": [8, 2, 8, 8, 5, 8, 8, 8, 8, 8], "per_call_input_tokens": inputs}
    got = latency_ratio(dense, low)
    assert isinstance(got, LatencyRatio) and got.ratio == pytest.approx(0.9) and got.same_output is False
    assert latency_ratio(dense, {**low, "per_call_tokens": [8] * 10}).same_output is True
    from lm_eval_lowrank.compare import _latency_ratio_cell

    cell = _latency_ratio_cell({"latency": dense}, {"latency": low}, 0.95)
    assert cell.startswith("0.900 [") and cell.endswith("(paired, 10 batches; the generated lengths differ, so this is the time to answer the same prompts)")
    other = {**low, "per_call_input_tokens": inputs[::-1]}
    assert latency_ratio(dense, other).startswith("the runs timed different batches")
    old = {k: v for k, v in low.items() if k != "per_call_input_tokens"}  # written before inputs were recorded
    assert latency_ratio(dense, old).startswith("the runs timed different batches")


def test_a_run_that_warmed_up_pairs_with_one_that_did_not_without_the_first_call():
    """The first call of a run without a warm-up forward holds CUDA's start-up: against a run that warmed up, it
    is left out of both, and said so; two runs alike keep every call. A sweep row keeps what the pairing needs."""
    from lm_eval_lowrank.compare import _latency_ratio_cell
    from lm_eval_lowrank.latency_stats import latency_ratio
    from lm_eval_lowrank.sweep import row_from_results

    tokens = list(range(100, 88, -1))
    cold = {"per_call_seconds": [3.0] + [1.0] * 11, "per_call_tokens": tokens, "per_call_input_tokens": tokens}
    warm = {**cold, "per_call_seconds": [0.8] * 12, "warmup_calls": 1}
    got = latency_ratio(cold, warm)
    assert got.ratio == pytest.approx(0.8) and got.calls == 11 and got.first_call_dropped
    assert latency_ratio({**cold, "warmup_calls": 0}, warm).first_call_dropped  # 0 is the same as none recorded
    both = latency_ratio({**cold, "warmup_calls": 2}, warm)
    assert both.calls == 12 and not both.first_call_dropped and both.ratio == pytest.approx(9.6 / 14)
    assert _latency_ratio_cell({"latency": cold}, {"latency": warm}, 0.95).endswith("(paired, 11 batches; one run warmed up and the other did not, so the first batch is left out of both)")
    short = {k: v[:9] if isinstance(v, list) else v for k, v in warm.items()}
    assert latency_ratio({k: v[:9] for k, v in cold.items()}, short) == "8 timed batches after leaving out the first of each run (one warmed up and the other did not) are too few (need 9)"
    results = {"results": {}, "config": {"lowrank": {"decomposition": {}, "latency": {**warm, "total_seconds": 9.6, "tokens": sum(tokens)}, "energy": {}, "memory": {}}}}
    assert row_from_results(results, [])["latency_calls"] == warm
