"""Structural analysis of weights (and activations): pure functions on tensors, no I/O.

Per matrix: the singular spectrum, energy kept at given ranks (sum of the top-r squared
singular values over all of them), effective rank (Roy & Vetterli: exp of the entropy of
the normalised singular values), stable rank (||W||_F^2 / ||W||_2^2), the rank needed for
90/95/99% of the energy, and sparsity (fraction of |w| < eps * max|w|).

For activations the same spectrum measures are taken of the layer's outputs Y = W X on
calibration data: the singular values of Y / sqrt(N) are the square roots of the
eigenvalues of W C_x W^T, so only the input covariance is needed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

ENERGY_LEVELS = (0.90, 0.95, 0.99)
DEFAULT_RANKS = (1, 8, 32, 128)


def singular_values(W: torch.Tensor) -> torch.Tensor:
    """Singular values (descending, fp64) of a 2-D tensor."""
    if W.dim() != 2:
        raise ValueError(f"expected a 2-D tensor, got shape {tuple(W.shape)}")
    return torch.linalg.svdvals(W.detach().to(torch.float64).cpu())


def output_singular_values(W: torch.Tensor, input_cov: torch.Tensor) -> torch.Tensor:
    """Singular values of Y/sqrt(N) for Y = W X, from C_x = X^T X / N (descending, fp64)."""
    from .methods.rom import output_spectrum

    evals = output_spectrum(W, input_cov)
    return evals[: min(W.shape)].clamp_min(0).sqrt()


def energy_at(s: torch.Tensor, ranks: Iterable[int]) -> dict[int, float]:
    """Fraction of sum(s^2) held by the top r singular values, for each r (capped at len(s))."""
    e = s.to(torch.float64).square()
    total = float(e.sum())
    cum = e.cumsum(0)
    out = {}
    for r in ranks:
        k = min(max(int(r), 0), len(s))
        out[int(r)] = 1.0 if total == 0 else (0.0 if k == 0 else float(cum[k - 1]) / total)
    return out


def rank_for_energy(s: torch.Tensor, level: float) -> int:
    """Smallest r whose top-r singular values hold at least ``level`` of the energy."""
    if not 0 < level <= 1:
        raise ValueError(f"level={level} is invalid: expected 0 < level <= 1")
    e = s.to(torch.float64).square()
    total = float(e.sum())
    if total == 0:
        return 0
    frac = e.cumsum(0) / total
    return int(torch.searchsorted(frac, torch.tensor(level - 1e-12, dtype=frac.dtype)).item()) + 1


def effective_rank(s: torch.Tensor) -> float:
    """exp(entropy) of p_i = s_i / sum(s): 1 for rank one, len(s) for a flat spectrum."""
    s = s.to(torch.float64)
    total = float(s.sum())
    if total == 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return math.exp(float(-(p * p.log()).sum()))


def stable_rank(s: torch.Tensor) -> float:
    """||W||_F^2 / ||W||_2^2 (0 for a zero matrix)."""
    s = s.to(torch.float64)
    if len(s) == 0 or float(s[0]) == 0:
        return 0.0
    return float(s.square().sum() / s[0].square())


def sparsity(W: torch.Tensor, eps: float = 1e-3) -> float:
    """Fraction of entries with |w| < eps * max|w|."""
    a = W.detach().abs().float()
    m = float(a.max()) if a.numel() else 0.0
    if m == 0:
        return 1.0
    return float((a < eps * m).float().mean())


@dataclass
class SpectrumSummary:
    shape: tuple[int, int]
    energy: dict[int, float]
    effective_rank: float
    stable_rank: float
    rank_for: dict[str, int]  # "90" -> r
    sparsity: float | None = None
    spectrum: list[float] = field(default_factory=list)

    def to_dict(self, with_spectrum: bool = True) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["energy"] = {str(k): v for k, v in self.energy.items()}
        if not with_spectrum:
            d.pop("spectrum")
        return d


def summarize(s: torch.Tensor, shape: tuple[int, int], ranks: Sequence[int] = DEFAULT_RANKS, levels: Sequence[float] = ENERGY_LEVELS, sparsity_value: float | None = None) -> SpectrumSummary:
    """All spectrum measures of one matrix from its singular values."""
    return SpectrumSummary(
        shape=(int(shape[0]), int(shape[1])),
        energy=energy_at(s, ranks),
        effective_rank=effective_rank(s),
        stable_rank=stable_rank(s),
        rank_for={f"{round(level * 100):d}": rank_for_energy(s, level) for level in levels},
        sparsity=sparsity_value,
        spectrum=[float(x) for x in s],
    )


def analyze_weight(W: torch.Tensor, ranks: Sequence[int] = DEFAULT_RANKS, eps: float = 1e-3) -> SpectrumSummary:
    return summarize(singular_values(W), tuple(W.shape), ranks, sparsity_value=sparsity(W, eps))


def analyze_activation(W: torch.Tensor, input_cov: torch.Tensor, ranks: Sequence[int] = DEFAULT_RANKS, input_sparsity: float | None = None) -> SpectrumSummary:
    return summarize(output_singular_values(W, input_cov), tuple(W.shape), ranks, sparsity_value=input_sparsity)


# -- presentation (pure: strings and arrays) ----------------------------------------------


def table_rows(results: dict[int, dict[str, dict[str, Any]]], kind: str = "weights") -> list[list[str]]:
    """Rows of (layer, tensor, shape, eff rank, stable rank, r90/95/99, energy@ranks, sparsity)."""
    rows = []
    for layer in sorted(results):
        for tensor, entry in results[layer].items():
            d = entry.get(kind)
            if d is None:
                continue
            energy = " ".join(f"{k}:{v:.3f}" for k, v in d["energy"].items())
            sp = "-" if d.get("sparsity") is None else f"{d['sparsity']:.4f}"
            rows.append([
                str(layer), tensor, "x".join(map(str, d["shape"])), f"{d['effective_rank']:.1f}", f"{d['stable_rank']:.2f}",
                str(d["rank_for"]["90"]), str(d["rank_for"]["95"]), str(d["rank_for"]["99"]), energy, sp,
            ])
    return rows


TABLE_HEADER = ["layer", "tensor", "shape", "eff. rank", "stable rank", "r@90%", "r@95%", "r@99%", "energy at r", "sparsity"]


def format_table(rows: list[list[str]], header: Sequence[str] = TABLE_HEADER, markdown: bool = True) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows])


HEATMAP_METRICS = ("r95_frac", "r90_frac", "r99_frac", "effective_rank_frac", "stable_rank", "sparsity")


def heatmap_matrix(results: dict[int, dict[str, dict[str, Any]]], metric: str = "r95_frac", kind: str = "weights") -> tuple[list[int], list[str], list[list[float]]]:
    """(layers, tensors, values[layer][tensor]) for a heat map; *_frac divide by min(shape)."""
    if metric not in HEATMAP_METRICS:
        raise ValueError(f"metric={metric!r} is invalid: valid {', '.join(HEATMAP_METRICS)}")
    layers = sorted(results)
    tensors = list(dict.fromkeys(t for L in layers for t in results[L]))
    grid = []
    for L in layers:
        row = []
        for t in tensors:
            d = results[L].get(t, {}).get(kind)
            if d is None:
                row.append(float("nan"))
                continue
            full = min(d["shape"])
            if metric.startswith("r") and metric.endswith("_frac") and metric != "effective_rank_frac":
                row.append(d["rank_for"][metric[1:3]] / full)
            elif metric == "effective_rank_frac":
                row.append(d["effective_rank"] / full)
            else:
                v = d.get(metric)
                row.append(float("nan") if v is None else float(v))
        grid.append(row)
    return layers, tensors, grid
