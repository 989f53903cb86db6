"""Measurement: latency of batched forwards, energy, peak memory. Optional, never fatal.

- Latency: CUDA events around every measured call on a GPU (read back lazily, so the
  hot path never synchronises); ``perf_counter`` around a synchronised call on a CPU.
- Energy: for a model on a GPU, NVML's total-energy counter of each GPU it occupies, read at the
  start of the evaluation and at each sync point (not per batch); where the counter is
  unsupported a background thread samples power and integrates it. For a model on the CPU,
  the RAPL counters of every CPU package and its DRAM (Linux powercap), polled often enough
  to see every wrap. An idle baseline (mean power over a short window before the
  evaluation) gives the energy above idle.
- Memory: the CUDA allocator's peak per device, or the process's peak RSS on a CPU; and the memory a device has
  free now (free_memory_bytes: CUDA's free plus torch's cache, or MemAvailable within this process's cgroups).

Every reading that cannot be taken is ``None`` with a reason string.
"""

from __future__ import annotations

import contextlib
import math
import os
import resource
import socket
import sys
import threading
import time
import weakref
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


def _peak_rss_bytes() -> int:
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru if sys.platform == "darwin" else ru * 1024  # Linux reports KiB


# -- free memory ----------------------------------------------------------------------

_UNLIMITED = 1 << 60  # a cgroup's "no limit" (v1 writes 2**63 rounded down to a page)


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _own_cgroup_dirs(root: str, proc_cgroup: str) -> list[str]:
    """The memory cgroup folders that bound this process, its own first, then each parent up to the mount's root
    (which is the process's own cgroup inside a container's namespace). v2 folders and v1's ``memory`` controller."""
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        lines = []
    dirs: list[str] = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        mount = root if controllers == "" else f"{root}/memory" if "memory" in controllers.split(",") else None
        if mount is None:
            continue
        parts = [p for p in path.split("/") if p]
        dirs += [f"{mount}/{'/'.join(parts[:k])}".rstrip("/") for k in range(len(parts), 0, -1)]
        dirs.append(mount)
    return dirs or [root, f"{root}/memory"]


def _cgroup_headroom(root: str = "/sys/fs/cgroup", proc_cgroup: str = "/proc/self/cgroup") -> int | None:
    """Bytes this process's memory cgroups may still take: the least, over its own cgroup and every parent with a
    limit, of that limit less what the cgroup uses (page cache that can be reclaimed not counted as used); None
    without a limit. A container's or a batch job's limit is often far below MemAvailable."""
    headrooms = []
    for folder in _own_cgroup_dirs(root, proc_cgroup):
        for limit_file, usage_file, inactive in (
            ("memory.max", "memory.current", "inactive_file"),  # cgroup v2
            ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),  # v1
        ):
            limit, usage = _read_int(f"{folder}/{limit_file}"), _read_int(f"{folder}/{usage_file}")
            if limit is None or usage is None or limit >= _UNLIMITED:
                continue
            try:
                stat = dict(line.split() for line in Path(f"{folder}/memory.stat").read_text().splitlines() if line.count(" ") == 1)
            except (OSError, ValueError):
                stat = {}
            reclaimable = int(stat[inactive]) if stat.get(inactive, "").isdigit() else 0
            headrooms.append(max(0, limit - usage + reclaimable))
    return min(headrooms) if headrooms else None


def free_memory_bytes(device: torch.device) -> int | None:
    """Bytes a new allocation on ``device`` can take now; None where that is not known. CUDA: the driver's free
    memory plus what torch's caching allocator holds unused. CPU: the kernel's MemAvailable, bounded by the headroom
    of this process's memory cgroups (Linux; elsewhere None)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type != "cpu":
        return None
    try:
        available = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
    headroom = _cgroup_headroom()
    return available if headroom is None else min(available, headroom)


# -- energy --------------------------------------------------------------------------


class _NvmlGPU:
    """One GPU's NVML counter (mJ since the driver loaded) and instantaneous power."""

    scope = "gpu"
    instant_power = True

    def __init__(self, nvml: Any, index: int) -> None:
        self.nvml = nvml
        self.handle = nvml.nvmlDeviceGetHandleByIndex(index)
        self.index = index
        uuid = nvml.nvmlDeviceGetUUID(self.handle)
        self.uuid = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
        name = nvml.nvmlDeviceGetName(self.handle)
        self.name = name.decode() if isinstance(name, bytes) else str(name)
        try:
            nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
            self.has_counter = True
        except Exception:
            self.has_counter = False

    def energy_j(self) -> float:
        return int(self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)) / 1000.0

    def power_w(self) -> float:
        return self.nvml.nvmlDeviceGetPowerUsage(self.handle) / 1000.0

    def describe(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name}


def _visible_gpu_indices(nvml: Any) -> list[int]:
    # NVML numbers all GPUs; CUDA_VISIBLE_DEVICES (indices or UUIDs) restricts which we own.
    count = nvml.nvmlDeviceGetCount()
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None or env.strip() == "":
        return list(range(count))
    out = []
    for tok in env.split(","):
        tok = tok.strip()
        if tok.isdigit() and int(tok) < count:
            out.append(int(tok))
        elif tok.startswith("GPU-"):
            for i in range(count):
                u = nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetHandleByIndex(i))
                u = u.decode() if isinstance(u, bytes) else str(u)
                if u == tok:
                    out.append(i)
    return out


def _nvml_gpu_of(cuda_index: int, visible: list[_NvmlGPU], every: list[_NvmlGPU] | None = None) -> _NvmlGPU | None:
    """The NVML GPU behind a CUDA device index, by UUID among ``every`` GPU NVML numbers: CUDA orders devices
    fastest first and NVML by PCI bus, so positions can differ, and CUDA_VISIBLE_DEVICES=1 names CUDA's second
    GPU, which need not be NVML's. Without a UUID from torch, the position among the ``visible`` GPUs."""
    try:
        uuid = str(torch.cuda.get_device_properties(cuda_index).uuid)
    except Exception:
        uuid = ""
    if uuid:
        for g in every if every is not None else visible:
            if g.uuid.removeprefix("GPU-").lower() == uuid.removeprefix("GPU-").lower():
                return g
    return visible[cuda_index] if 0 <= cuda_index < len(visible) else None


RAPL_ROOT = Path("/sys/class/powercap")
# A package counter of ~262 kJ wraps after ~9 min at 500 W; polling far more often than that misses no wrap.
RAPL_POLL_SECONDS = 2.0


class _RaplZone:
    """One RAPL counter (a CPU package, or the DRAM beside it): microjoules that wrap at max_energy_range_uj.

    Reading it folds any wrap into a running total, so it must be read more often than it wraps
    (EnergyMeter polls it). It has no instantaneous power: idle power is a counter difference.
    """

    scope = "cpu"
    has_counter = True
    instant_power = False

    def __init__(self, path: Path, host: str) -> None:
        self.path = path
        self.zone = path.name
        self.name = (path / "name").read_text().strip()
        self.uuid = f"{host}:{self.zone}"  # processes on one host share it: counted once when aggregated
        self._range_uj = int((path / "max_energy_range_uj").read_text())
        self._lock = threading.Lock()
        self._last_uj = self._raw()  # raises PermissionError where the counter is root-only
        self._total_uj = 0

    def _raw(self) -> int:
        return int((self.path / "energy_uj").read_text())

    def energy_j(self) -> float:
        with self._lock:
            now = self._raw()
            delta = now - self._last_uj
            if delta < 0:  # wrapped
                delta += self._range_uj
            self._total_uj += delta
            self._last_uj = now
            return self._total_uj / 1e6

    def describe(self) -> dict[str, Any]:
        return {"zone": self.zone, "name": self.name}


def rapl_zones(root: Path | None = None) -> tuple[list[_RaplZone], str | None]:
    """The CPU packages' RAPL counters and their DRAM counters, or ([], why not).

    Top-level ``psys`` zones cover the whole platform (packages included) and core/uncore zones sit
    inside their package, so neither is added: the zones returned never overlap.
    """
    root = RAPL_ROOT if root is None else root
    tops = sorted((p for p in root.glob("intel-rapl:*") if p.name.count(":") == 1), key=lambda p: int(p.name.split(":")[1]))
    if not tops:
        return [], f"no RAPL counters ({root}/intel-rapl:*)"
    host = socket.gethostname()
    zones: list[_RaplZone] = []
    try:
        for top in tops:
            if not (top / "name").read_text().strip().startswith("package"):
                continue
            zones.append(_RaplZone(top, host))
            for sub in sorted(root.glob(f"{top.name}:*")):
                if (sub / "name").read_text().strip() == "dram":
                    zones.append(_RaplZone(sub, host))
    except PermissionError as exc:
        return [], f"RAPL counters not readable ({exc.filename} is root-only on current kernels; `sudo chmod o+r` on the energy_uj files opens them)"
    except (OSError, ValueError) as exc:
        return [], f"RAPL counters unreadable: {exc}"
    if not zones:
        return [], f"no RAPL package zone ({root})"
    return zones, None


class EnergyMeter:
    """Energy over an interval, per counter and in total; ``available`` is False with a reason otherwise.

    A model on a GPU is measured by NVML (the GPUs it occupies: ``cuda_devices``, CUDA indices; every
    visible GPU when not given); a model on the CPU by RAPL (every CPU package and its DRAM). Both are
    whole-device counters: other work on the device counts too.
    """

    def __init__(
        self, idle_seconds: float = 1.0, sample_interval: float = 0.05, device: torch.device | str = "cuda", cuda_devices: Iterable[int] | None = None
    ) -> None:
        self.available = False
        self.reason: str | None = None
        self.sources: list[Any] = []
        self.idle_seconds = idle_seconds
        self.sample_interval = sample_interval
        self.idle_power_w: dict[str, float] = {}
        self._start_j: dict[str, float] = {}
        self._sampled_j: dict[str, float] = {}
        self._t_start: float | None = None
        self._sampler: threading.Thread | None = None
        self._stop = threading.Event()
        self._sampled_at = 0.0  # the end of the span _sampled_j covers
        self._sample_lock = threading.Lock()
        self._excluded_j: dict[str, float] = {}  # energy of excluded spans (batch-size probes), per counter
        self._excluded_s = 0.0
        if torch.device(device).type == "cuda" and torch.cuda.is_available():
            self.sources, self.reason = self._nvml_gpus(None if cuda_devices is None else list(cuda_devices))
        elif torch.device(device).type in ("cpu", "cuda"):  # "cuda" without CUDA: HFLM runs it on the CPU
            self.sources, reason = rapl_zones()
            self.reason = None if self.sources else f"no GPU in use, and {reason}"
        else:
            self.reason = f"no energy counter for device {torch.device(device).type!r}"
        self.available = bool(self.sources)

    @staticmethod
    def _nvml_gpus(cuda_devices: list[int] | None) -> tuple[list[_NvmlGPU], str | None]:
        try:
            import pynvml as nvml  # from the nvidia-ml-py package
        except ImportError:
            return [], "pynvml not installed (pip install nvidia-ml-py)"
        try:
            nvml.nvmlInit()
            every = [_NvmlGPU(nvml, i) for i in range(nvml.nvmlDeviceGetCount())]
            gpus = [every[i] for i in _visible_gpu_indices(nvml)]
        except Exception as exc:  # driver without NVML, containers, ...
            return [], f"NVML unavailable: {exc}"
        if not gpus:
            return [], "NVML sees no visible GPU"
        if cuda_devices is None:
            return gpus, None
        used = [g for g in (_nvml_gpu_of(i, gpus, every) for i in sorted(set(cuda_devices))) if g is not None]
        return used, None if used else f"NVML finds none of the GPUs in use (CUDA devices {sorted(set(cuda_devices))})"

    @property
    def method(self) -> str | None:
        if not self.available:
            return None
        if self.sources[0].scope == "cpu":
            return "rapl_energy_counter"
        return "nvml_energy_counter" if all(g.has_counter for g in self.sources) else "nvml_power_sampling"

    def _fail(self, when: str, exc: Exception) -> None:
        """A counter that fails mid-run (a lost GPU, a driver error) ends the energy figures, not the evaluation."""
        self.available = False
        self.reason = f"energy counter failed {when}: {exc.__class__.__name__}: {exc}"

    def measure_idle(self) -> None:
        """Mean power over a short idle window, per counter (subtracted to give energy above idle)."""
        if not self.available or self.idle_seconds <= 0:
            return
        try:
            self._measure_idle()
        except Exception as exc:
            self._fail("measuring idle power", exc)

    def _measure_idle(self) -> None:
        samples: dict[str, list[float]] = {g.uuid: [] for g in self.sources if g.instant_power}
        t0 = time.perf_counter()
        before = {g.uuid: g.energy_j() for g in self.sources if not g.instant_power}
        end = t0 + self.idle_seconds
        while time.perf_counter() < end:
            for g in self.sources:
                if g.instant_power:
                    try:
                        samples[g.uuid].append(g.power_w())
                    except Exception:
                        pass
            time.sleep(self.sample_interval)
        elapsed = time.perf_counter() - t0
        idle = {u: sum(v) / len(v) for u, v in samples.items() if v}
        for g in self.sources:
            if not g.instant_power:
                idle[g.uuid] = (g.energy_j() - before[g.uuid]) / elapsed
        self.idle_power_w = idle

    def start(self) -> None:
        if not self.available or self._t_start is not None:
            return
        t_start = time.perf_counter()
        try:
            start_j = {g.uuid: g.energy_j() for g in self.sources if g.has_counter}
        except Exception as exc:
            self._fail("at the first measured call", exc)
            return
        self._t_start = t_start
        self._start_j = start_j
        self._sampled_j = {g.uuid: 0.0 for g in self.sources if not g.has_counter}
        self._sampled_at = t_start  # integrated from the start, not from when the thread first runs
        sampled = any(not g.has_counter for g in self.sources)
        if sampled or any(not g.instant_power for g in self.sources):
            interval = self.sample_interval if sampled else RAPL_POLL_SECONDS
            # the thread holds the meter weakly: a meter no one holds any more stops its sampler
            self._sampler = threading.Thread(target=_sample_loop, args=(weakref.ref(self), self._stop, interval), daemon=True)
            self._sampler.start()

    def _sample(self) -> None:
        """Integrates power where there is no counter, and reads RAPL counters often enough to see every wrap."""
        with self._sample_lock:
            now = time.perf_counter()
            for g in self.sources:
                try:
                    if not g.has_counter:
                        self._sampled_j[g.uuid] += g.power_w() * (now - self._sampled_at)
                    elif not g.instant_power:
                        g.energy_j()
                except Exception:
                    pass
            self._sampled_at = now

    def _since_start(self, where: str) -> tuple[float, dict[str, float]] | None:
        """(seconds, joules per counter) since ``start``, or None when a counter failed (energy then unavailable)."""
        with self._sample_lock:
            now = time.perf_counter()
            try:
                now_j = {g.uuid: g.energy_j() for g in self.sources if g.has_counter}
            except Exception as exc:
                self._fail(where, exc)
                return None
            joules = {u: now_j[u] - self._start_j[u] for u in now_j}
            # sampled power covers up to the last sample: the rest of the span at the power now, so that the
            # joules and the idle subtraction (idle watts x elapsed) cover the same span
            for g in self.sources:
                if not g.has_counter:
                    try:
                        tail = g.power_w() * (now - self._sampled_at)
                    except Exception:
                        tail = 0.0
                    joules[g.uuid] = self._sampled_j.get(g.uuid, 0.0) + tail
        return now - self._t_start, joules

    @contextmanager
    def paused(self) -> Iterator[None]:
        """A span left out of the energy and of its seconds (batch-size probes, which latency leaves out too)."""
        if not self.available or self._t_start is None:
            yield  # not started: nothing before the first measured call counts anyway
            return
        before = self._since_start("before an excluded span")
        try:
            yield
        finally:
            after = self._since_start("after an excluded span") if self.available and before is not None else None
            if before is not None and after is not None:
                self._excluded_s += after[0] - before[0]
                for u, j in after[1].items():
                    self._excluded_j[u] = self._excluded_j.get(u, 0.0) + j - before[1].get(u, 0.0)

    def read(self) -> dict[str, Any]:
        """Energy since ``start`` (joules), per counter and in total, excluded spans left out."""
        if not self.available:
            return {"available": False, "reason": self.reason}
        if self._t_start is None:
            return {"available": False, "reason": "no measured forward ran"}
        parts: dict[str, dict[str, Any]] = {}
        since = self._since_start("at the end")
        if since is None:
            return {"available": False, "reason": self.reason}
        elapsed, measured = since
        elapsed -= self._excluded_s
        for g in self.sources:
            joules = measured.get(g.uuid, 0.0) - self._excluded_j.get(g.uuid, 0.0)
            idle_w = self.idle_power_w.get(g.uuid)
            parts[g.uuid] = {
                **g.describe(),
                "joules": joules,
                "idle_watts": idle_w,
                "joules_above_idle": None if idle_w is None else max(joules - idle_w * elapsed, 0.0),
            }
        key = "per_gpu" if self.sources[0].scope == "gpu" else "per_rapl_zone"
        return {"available": True, "method": self.method, "seconds": elapsed, key: parts}

    def close(self) -> None:
        self._stop.set()


def _sample_loop(meter_ref: weakref.ref, stop: threading.Event, interval: float) -> None:
    while not stop.wait(interval):
        meter = meter_ref()
        if meter is None:
            return
        meter._sample()
        del meter  # not held while waiting


def energy_readiness(device: torch.device | str) -> dict[str, Any]:
    """What energy a model on ``device`` would be measured with, found without measuring anything."""
    meter = EnergyMeter(idle_seconds=0, device=device)
    try:
        if not meter.available:
            return {"available": False, "reason": meter.reason}
        counters = {g.uuid: {**g.describe(), "counter": g.has_counter} for g in meter.sources}
        return {"available": True, "method": meter.method, "counters": counters}
    finally:
        meter.close()


ENERGY_PARTS = ("per_gpu", "per_rapl_zone")


def _energy_parts(e: dict[str, Any]) -> tuple[str, dict[str, dict[str, Any]]]:
    for key in ENERGY_PARTS:
        if key in e:
            return key, e[key]
    return ENERGY_PARTS[0], {}


# -- latency and memory --------------------------------------------------------------


@dataclass
class CallRecord:
    kind: str  # "model_call" | "generate"
    tokens: int  # the tokens it served: the batch's (padded) tokens, or the new tokens of a generate call
    input_tokens: int | None = None  # the batch it was given: what identifies it across two runs
    seconds: float | None = None
    _events: tuple[Any, Any] | None = None


@dataclass
class Meter:
    """Latency of every measured call, tokens, energy and peak memory of one evaluation."""

    device: torch.device
    energy: EnergyMeter | None = None
    cuda_devices: list[int] = field(default_factory=list)  # the CUDA devices the model occupies
    records: list[CallRecord] = field(default_factory=list)
    excluded_calls: int = 0
    warmup_calls: int = 0  # forwards to run untimed before the first timed call (CUDA's lazy start-up)
    warmup_calls_run: int = 0
    _excluding: int = 0
    _peak_before: dict[int, int] = field(default_factory=dict)  # CUDA peaks before excluded spans reset them
    _pending: list[CallRecord] = field(default_factory=list)

    @classmethod
    def create(
        cls,
        device: torch.device | str,
        measure_energy: bool = True,
        idle_seconds: float = 1.0,
        model_devices: Iterable[torch.device] | None = None,
        warmup_calls: int = 0,
    ) -> Meter:
        """``model_devices``: where the model's parameters live (several GPUs with ``parallelize=True``);
        ``warmup_calls``: untimed forwards the caller runs (``warmup``) before the first timed call."""
        device = torch.device(device)
        cuda_ok = torch.cuda.is_available()
        used = sorted({d.index or 0 for d in (model_devices or []) if d.type == "cuda"}) if cuda_ok else []
        energy = EnergyMeter(idle_seconds=idle_seconds, device=device, cuda_devices=used or [device.index or 0]) if measure_energy else None
        if cuda_ok and device.type == "cuda":
            for i in used or [device.index or 0]:
                torch.cuda.reset_peak_memory_stats(i)
        return cls(device=device, energy=energy, cuda_devices=used, warmup_calls=warmup_calls)

    @property
    def sharded(self) -> bool:
        """The model spans several GPUs (model parallel): one stream's events cannot time it."""
        return len(self.cuda_devices) > 1

    @property
    def uses_cuda_events(self) -> bool:
        return self.device.type == "cuda" and torch.cuda.is_available() and not self.sharded

    @property
    def timer(self) -> str:
        if self.uses_cuda_events:
            return "cuda_events"
        return "perf_counter_cuda_synchronized" if self.sharded else "perf_counter"

    def _sync_all(self) -> None:
        for i in self.cuda_devices:
            torch.cuda.synchronize(i)

    @property
    def wants_warmup(self) -> bool:
        """A warm-up forward is due: before the first timed call, while fewer than ``warmup_calls`` ran."""
        return not self.records and not self._pending and self.warmup_calls_run < self.warmup_calls and not self._excluding

    @contextmanager
    def warmup(self):
        """A warm-up forward: left out like a probe, and counted as a warm-up."""
        with self.excluded():
            yield
        self.warmup_calls_run += 1

    @contextmanager
    def excluded(self):
        """Calls inside (e.g. batch-size probing) are not measured: not their latency, their energy (once the meter
        runs: the probes of a second request type come after the first's calls) nor their CUDA memory peak."""
        self._excluding += 1
        gpus = self._peak_devices()
        for i in gpus:  # the peak so far is kept; the probe's own is dropped below
            self._peak_before[i] = max(self._peak_before.get(i, 0), torch.cuda.max_memory_allocated(i))
        try:
            with self.energy.paused() if self.energy is not None else contextlib.nullcontext():
                yield
        finally:
            self._excluding -= 1
            for i in gpus:
                torch.cuda.reset_peak_memory_stats(i)

    def _peak_devices(self) -> list[int]:
        if self.device.type != "cuda" or not torch.cuda.is_available():
            return []
        return self.cuda_devices or list(range(torch.cuda.device_count()))

    @contextmanager
    def measure(self, kind: str, tokens: int, input_tokens: int | None = None):
        rec = CallRecord(kind, tokens, input_tokens)  # yielded, so a caller can set tokens known only afterwards
        if self._excluding:
            self.excluded_calls += 1
            yield rec
            return
        if self.energy is not None:
            self.energy.start()
        if self.uses_cuda_events:
            # The model's device's stream, not the current device's: HFLM puts a model on cuda:1 without making
            # it the current device, and events on cuda:0's idle stream would time only the launches.
            stream = torch.cuda.current_stream(self.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            yield rec
            end.record(stream)
            rec._events = (start, end)
            self._pending.append(rec)
            if len(self._pending) >= 256:  # bound the number of live events
                self._resolve()
        else:
            # A sharded model: each GPU runs its own stream, so wait for all of them around the
            # call (CPU ops are synchronous and need no wait).
            self._sync_all()
            t0 = time.perf_counter()
            yield rec
            self._sync_all()
            rec.seconds = time.perf_counter() - t0
        self.records.append(rec)

    def _resolve(self) -> None:
        if not self._pending:
            return
        self._pending[-1]._events[1].synchronize()  # one stream: the last event done, every earlier one is
        for rec in self._pending:
            start, end = rec._events
            rec.seconds = start.elapsed_time(end) / 1000.0
            rec._events = None
        self._pending.clear()

    def peak_memory(self) -> dict[str, Any]:
        if self.device.type == "cuda" and torch.cuda.is_available():
            peak = {i: max(torch.cuda.max_memory_allocated(i), self._peak_before.get(i, 0)) for i in self._peak_devices()}
            per = {str(i): v for i, v in peak.items()}
            # the devices the model occupies: a sharded model's peak is their sum
            total = sum(per.values()) if self.cuda_devices else max(per.values())
            return {"kind": "cuda_max_memory_allocated", "bytes": total, "per_device": per, "process_peak_rss_bytes": _peak_rss_bytes()}
        return {"kind": "process_peak_rss", "bytes": _peak_rss_bytes()}

    def summary(self) -> dict[str, Any]:
        """Per-process figures; :func:`aggregate` combines several processes."""
        if self.uses_cuda_events:
            self._resolve()
        by_kind: dict[str, dict[str, Any]] = {}
        for rec in self.records:
            k = by_kind.setdefault(rec.kind, {"calls": 0, "seconds": 0.0, "tokens": 0})
            k["calls"] += 1
            k["seconds"] += rec.seconds or 0.0
            k["tokens"] += rec.tokens
        total_s = sum(k["seconds"] for k in by_kind.values())
        total_tok = sum(k["tokens"] for k in by_kind.values())
        calls = sum(k["calls"] for k in by_kind.values())
        energy = self.energy.read() if self.energy is not None else {"available": False, "reason": "energy measurement disabled"}
        seconds = [round(rec.seconds or 0.0, CALL_SECONDS_DIGITS) for rec in self.records]
        return {
            "latency": {
                "timer": self.timer,
                "total_seconds": total_s,
                "calls": calls,
                "mean_seconds_per_batch": total_s / calls if calls else None,
                "seconds_per_batch_percentiles": percentiles(seconds),
                "tokens": total_tok,
                "tokens_per_second": total_tok / total_s if total_s > 0 else None,
                "excluded_calls": self.excluded_calls,
                "warmup_calls": self.warmup_calls_run,
                "by_kind": by_kind,
                # In call order, so that two runs over the same batches can be compared call by call.
                "per_call_seconds": seconds,
                "per_call_tokens": [rec.tokens for rec in self.records],
                "per_call_input_tokens": [rec.input_tokens for rec in self.records],
            },
            "energy": energy,
            "memory": self.peak_memory(),
        }


CALL_SECONDS_DIGITS = 7  # 0.1 µs: finer than a CUDA event's resolution (~0.5 µs)
PERCENTILES = (50, 90, 99)


def percentiles(values: Sequence[float]) -> dict[str, float] | None:
    """p50/p90/p99 (linear interpolation between order statistics) and the max; None without values."""
    if not values:
        return None
    ordered = sorted(values)
    out = {}
    for p in PERCENTILES:
        pos = (len(ordered) - 1) * p / 100
        lo = math.floor(pos)
        hi = min(lo + 1, len(ordered) - 1)
        out[f"p{p}"] = ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)
    out["max"] = ordered[-1]
    return out


def aggregate(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """Combine per-process summaries: latency summed, energy summed over unique GPUs.

    Processes that share a GPU report the same UUID; that GPU's energy is counted once
    (the largest reading: each counter covers the whole device over overlapping windows).
    """
    if len(summaries) == 1:
        out = dict(summaries[0])
        out["processes"] = 1
        return _finish(out)
    lat = {"timer": summaries[0]["latency"]["timer"], "total_seconds": 0.0, "calls": 0, "tokens": 0, "excluded_calls": 0, "warmup_calls": 0, "by_kind": {}}
    for s in summaries:
        L = s["latency"]
        for key in ("total_seconds", "calls", "tokens", "excluded_calls", "warmup_calls"):
            lat[key] += L.get(key, 0)
        for kind, v in L["by_kind"].items():
            d = lat["by_kind"].setdefault(kind, {"calls": 0, "seconds": 0.0, "tokens": 0})
            for key in d:
                d[key] += v[key]
    lat["mean_seconds_per_batch"] = lat["total_seconds"] / lat["calls"] if lat["calls"] else None
    if all("per_call_seconds" in s["latency"] for s in summaries):  # process by process, in rank order
        lat["per_call_seconds"] = [t for s in summaries for t in s["latency"]["per_call_seconds"]]
        lat["per_call_tokens"] = [n for s in summaries for n in s["latency"]["per_call_tokens"]]
        if all("per_call_input_tokens" in s["latency"] for s in summaries):
            lat["per_call_input_tokens"] = [n for s in summaries for n in s["latency"]["per_call_input_tokens"]]
        lat["seconds_per_batch_percentiles"] = percentiles(lat["per_call_seconds"])
    # Processes run in parallel: throughput is tokens over the slowest process's busy time.
    slowest = max(s["latency"]["total_seconds"] for s in summaries)
    lat["tokens_per_second"] = lat["tokens"] / slowest if slowest > 0 else None
    lat["per_process_seconds"] = [s["latency"]["total_seconds"] for s in summaries]
    gpus: dict[str, dict[str, Any]] = {}
    reasons = []
    unmeasured = []  # processes that ran measured calls without an energy reading
    method = None
    for s in summaries:
        e = s["energy"]
        if not e.get("available"):
            reasons.append(e.get("reason"))
            if s["latency"]["calls"]:
                unmeasured.append(e.get("reason"))
            continue
        method = e.get("method")
        parts_key, parts = _energy_parts(e)
        for uuid, g in parts.items():
            if uuid not in gpus or g["joules"] > gpus[uuid]["joules"]:
                gpus[uuid] = g
    if gpus and unmeasured:  # a partial sum read as the total would make the run look cheaper than it was
        measured = len(summaries) - len(unmeasured)
        energy = {"available": False, "reason": f"energy read by {measured} of {len(summaries)} processes; one that ran without it: {unmeasured[0]}"}
    elif gpus:
        energy = {"available": True, "method": method, parts_key: gpus}
    else:
        energy = {"available": False, "reason": reasons[0] if reasons else "unknown"}
    mem_bytes = [s["memory"]["bytes"] for s in summaries]
    # bytes: what the largest process needed (one per GPU: each GPU's peak); total_bytes: all of them at once, what
    # processes sharing one GPU or host (CPU runs: RSS) take together at most.
    memory = {"kind": summaries[0]["memory"]["kind"], "bytes": max(mem_bytes), "total_bytes": sum(mem_bytes), "per_process_bytes": mem_bytes}
    return _finish({"latency": lat, "energy": energy, "memory": memory, "processes": len(summaries)})


def _finish(s: dict[str, Any]) -> dict[str, Any]:
    """Totals and per-token figures, with null and a reason when energy is unavailable."""
    e = s["energy"]
    tokens = s["latency"]["tokens"]
    if e.get("available"):
        parts = _energy_parts(e)[1]
        total = sum(g["joules"] for g in parts.values())
        above = [g["joules_above_idle"] for g in parts.values()]
        e["total_joules"] = total
        e["total_joules_above_idle"] = None if any(a is None for a in above) else sum(above)
        e["joules_per_token"] = total / tokens if tokens else None
    else:
        e.setdefault("reason", "unavailable")
        e["total_joules"] = None
        e["joules_per_token"] = None
    return s
