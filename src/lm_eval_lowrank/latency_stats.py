"""Paired statistics of two runs' per-call latencies (pure Python: no torch import).

Two runs with the same tasks, limit and a fixed batch size time the same batches in the same order (lm-eval
orders its requests deterministically), so their per-call timings pair call by call. Used by ``compare``, the
search and the sweep report.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


def _t_two_sided_mass(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with an integer ``df`` (Abramowitz & Stegun 26.7.3-4: a finite series in cos θ)."""
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2:
        term, total = 1.0, 1.0 if df > 1 else 0.0
        for k in range(1, (df - 3) // 2 + 1):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        return 2 / math.pi * (theta + (math.sin(theta) * math.cos(theta) * total if df > 1 else 0.0))
    term, total = 1.0, 1.0
    for k in range(1, (df - 2) // 2 + 1):
        term *= c2 * (2 * k - 1) / (2 * k)
        total += term
    return math.sin(theta) * total


def t_quantile(confidence: float, df: int) -> float:
    """The t with P(|T| < t) = ``confidence`` for Student's t with ``df`` degrees of freedom (bisection)."""
    lo, hi = 0.0, 1.0
    while _t_two_sided_mass(hi, df) < confidence:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_two_sided_mass(mid, df) < confidence else (lo, mid)
        if hi - lo < 1e-12 * hi:
            break
    return (lo + hi) / 2


@dataclass(frozen=True)
class LatencyRatio:
    """A run's total forward time over the reference's on the same batches, with a ``confidence`` interval."""

    ratio: float
    lower: float
    upper: float
    calls: int
    blocks: int
    same_output: bool = True  # False: generate calls made different numbers of new tokens (the ratio includes that)
    first_call_dropped: bool = False  # one run warmed up and the other did not: the first call left out of both


MIN_LATENCY_BLOCKS = 3


def latency_ratio(reference: Mapping[str, Any], run: Mapping[str, Any], confidence: float = 0.95) -> LatencyRatio | str:
    """The paired latency ratio of two runs' ``latency`` blocks, or why there is none.

    The runs must have timed the same batches (the same input token counts, call by call: lm-eval orders its
    requests deterministically, so the same tasks, limit and a fixed batch size give them). Generate calls may
    still make different numbers of new tokens: the ratio is then the time to answer the same prompts, and
    ``same_output`` is False. The ratio R = Σ run / Σ reference
    is a ratio estimator; its standard error comes from the residuals C_b - R·D_b of max(3, n^⅓) contiguous blocks
    of calls (batch means), and the interval uses Student's t with blocks - 1 degrees of freedom. Few long blocks,
    because slow stretches of a shared machine last many calls: with calls taken as independent, a 95 % interval
    covered the true ratio 44 % of the time under AR(1) noise of lag-1 correlation 0.8 (400 calls), and about 92 %
    with these blocks. It is approximate, and covers the noise within the two runs, not a drift between them
    (another tenant all through one run): for that, interleave repeated runs, as ``benchmarks/`` does.
    """
    d, c = reference.get("per_call_seconds"), run.get("per_call_seconds")
    if d is None or c is None:
        return "no per-call timings in a run (written before they were recorded, or not an hf-tucker run)"
    # Batches are identified by their inputs; runs written before those were recorded, by the tokens served.
    key = "per_call_input_tokens" if "per_call_input_tokens" in reference and "per_call_input_tokens" in run else "per_call_tokens"
    # Token counts absent from both runs compare equal (None == None): the call counts must still agree.
    if len(d) != len(c) or reference.get(key) != run.get(key):
        return f"the runs timed different batches ({len(d)} and {len(c)} calls): use the same tasks, limit and a fixed batch_size"
    same_output = reference.get("per_call_tokens") == run.get("per_call_tokens")
    # A run without a warm-up forward (warmup_calls 0, or written before there were any) times CUDA's start-up in
    # its first call; against one that warmed up, that call is left out of both.
    first_call_dropped = (int(reference.get("warmup_calls") or 0) > 0) != (int(run.get("warmup_calls") or 0) > 0)
    if first_call_dropped:
        d, c = d[1:], c[1:]
    n = len(d)
    if n < MIN_LATENCY_BLOCKS**2:
        dropped = " after leaving out the first of each run (one warmed up and the other did not)" if first_call_dropped else ""
        return f"{n} timed batches{dropped} are too few (need {MIN_LATENCY_BLOCKS ** 2})"
    blocks = max(MIN_LATENCY_BLOCKS, round(n ** (1 / 3)))
    edges = [round(i * n / blocks) for i in range(blocks + 1)]
    D = [sum(d[a:b]) for a, b in zip(edges, edges[1:])]
    C = [sum(c[a:b]) for a, b in zip(edges, edges[1:])]
    total_d = sum(D)
    if total_d <= 0:
        return "the reference's timings are zero"
    ratio = sum(C) / total_d
    residual_ss = sum((cb - ratio * db) ** 2 for cb, db in zip(C, D))
    stderr = math.sqrt(blocks / (blocks - 1) * residual_ss) / total_d
    half = t_quantile(confidence, blocks - 1) * stderr
    # a ratio of times is >= 0: a symmetric interval crosses zero only under noise larger than the ratio itself
    return LatencyRatio(ratio, max(0.0, ratio - half), ratio + half, n, blocks, same_output, first_call_dropped)
