"""``lm-eval-lowrank env``: what a run on this machine will measure, before a long evaluation starts.

Versions, whether lm-eval resolves both ``hf`` and ``hf-tucker``, the timer, the energy counters
(NVML for a model on a GPU, RAPL for one on the CPU) and the reason where there are none, the
solvers ``auto`` takes, the methods and architectures, and where the data and caches are.
"""

from __future__ import annotations

import json
from typing import Any

import click


def _registry() -> dict[str, Any]:
    """Both models resolve: the check of lm-eval 0.4.13's empty-registry trap, in this process."""
    try:
        from lm_eval.api.registry import get_model

        hf, tucker = get_model("hf"), get_model("hf-tucker")
        ok = issubclass(tucker, hf)
        return {"ok": ok, "hf": f"{hf.__module__}.{hf.__name__}", "hf-tucker": f"{tucker.__module__}.{tucker.__name__}"}
    except Exception as exc:  # reported, not raised: the point is to say what is wrong
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


def _cpu_solvers() -> str:
    from ..methods.tucker import _scipy_linalg, gram_solves_release_gil

    if gram_solves_release_gil():
        return "krylov / gram (syrk + syevr from scipy's C exports, without the GIL: solves run in parallel threads)"
    if _scipy_linalg() is not None:
        return "krylov / gram (scipy syrk + syevr, holding the GIL: Gram solves run one at a time)"
    return "krylov / gram (torch eigh: scipy missing)"


def environment() -> dict[str, Any]:
    import torch

    from ..api import versions
    from ..architectures import known_architectures
    from ..assets import cache_root
    from ..measure import energy_readiness
    from ..spec import CALIBRATED_METHODS, METHOD_OPTIONS, METHODS
    from ..tasks import DataDirError, data_dir

    cuda = torch.cuda.is_available()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []
    try:
        data: dict[str, Any] = {"dir": str(data_dir())}
    except DataDirError as exc:
        data = {"dir": None, "error": str(exc)}
    return {
        "versions": versions(),
        "registry": _registry(),
        "cpu": {"torch_threads": torch.get_num_threads(), "energy": energy_readiness("cpu")},
        "cuda": {"available": cuda, "gpus": gpus, "energy": energy_readiness("cuda") if cuda else {"available": False, "reason": "no CUDA GPU"}},
        "timer": "cuda_events on a GPU, perf_counter on the CPU",
        "solvers": {
            "cpu": _cpu_solvers(),
            "cuda": "randomized / exact",
        },
        "methods": {m: {"calibrated": m in CALIBRATED_METHODS, "options": sorted(o for o, owner in METHOD_OPTIONS.items() if owner == m)} for m in METHODS},
        "architectures": known_architectures(),
        "data": data,
        "cache": str(cache_root()),
    }


def _energy_line(e: dict[str, Any]) -> str:
    if not e.get("available"):
        return f"n/a: {e.get('reason')}"
    names = ", ".join(str(c.get("name")) for c in e["counters"].values())
    return f"{e['method']} ({names})"


def _methods_line(methods: dict[str, Any]) -> str:
    def one(name: str, m: dict[str, Any]) -> str:
        return name + (f" ({', '.join(m['options'])})" if m["options"] else "")

    free = [one(n, m) for n, m in methods.items() if not m["calibrated"]]
    calibrated = [one(n, m) for n, m in methods.items() if m["calibrated"]]
    return f"data-free: {', '.join(free)}; calibrated (calib=): {', '.join(calibrated)}"


@click.command("env")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of lines.")
def env(as_json: bool) -> None:
    """What a run here will measure: versions, registration, timer, energy counters, solvers, data, caches."""
    info = environment()
    reg = info["registry"]
    if as_json:
        click.echo(json.dumps(info, indent=1))
        if not reg["ok"]:  # the same exit code as the lines: a script checks it either way
            raise SystemExit(1)
        return
    rows = [
        ("versions", ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v)),
        ("lm-eval models", "hf and hf-tucker both resolve" if reg["ok"] else f"BROKEN: {reg.get('error') or reg}"),
        ("CPU", f"{info['cpu']['torch_threads']} torch threads"),
        ("GPUs", ", ".join(info["cuda"]["gpus"]) or "none"),
        ("latency timer", info["timer"]),
        ("energy, model on CPU", _energy_line(info["cpu"]["energy"])),
        ("energy, model on GPU", _energy_line(info["cuda"]["energy"])),
        ("solvers (auto)", f"CPU: {info['solvers']['cpu']}; GPU: {info['solvers']['cuda']}"),
        ("methods", _methods_line(info["methods"])),
        ("architectures", ", ".join(info["architectures"]) + "; others read off the model: nn.Linear projections by leaf name, stacked experts as <module>.<parameter>"),
        ("benchmark data", info["data"]["dir"] or f"not found: {info['data']['error']}"),
        ("cache", info["cache"]),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        click.echo(f"{k:<{width}}  {v}")
    if not reg["ok"]:
        raise SystemExit(1)
