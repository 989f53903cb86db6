"""Timing shared by the benchmark scripts (run as ``python benchmarks/NAME.py``)."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, collect: bool = False) -> float:
    """Seconds of one call of ``fn``, with the device synchronised on both sides.

    The garbage collector is off inside the call (a collection would land in whichever timing
    happens to trigger it); ``collect`` runs one before the clock starts, for calls long enough
    that its cost does not matter.
    """
    if collect:
        gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - t0
    finally:
        if enabled:
            gc.enable()
