"""The GPU checklist's commands name only flags their scripts accept: a renamed flag would otherwise
surface in device minutes, which are scarce, rather than here."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
CHECKLIST = ROOT / "benchmarks" / "gpu_checklist.sh"


def _checklist_commands() -> dict[str, set[str]]:
    """script name -> the flags the checklist passes it, its smoke mode's too (continuation lines joined,
    the smoke mode's bash arrays expanded)."""
    text = CHECKLIST.read_text().replace("\\\n", " ")
    for name, value in re.findall(r"^\s*(\w+)=\((--[^)]*)\)$", text, flags=re.M):
        text = text.replace(f'"${{{name}[@]}}"', value)
    out: dict[str, set[str]] = {}
    for line in text.splitlines():
        m = re.search(r"benchmarks/(\w+)\.py(.*)", line)
        if m and line.strip().startswith("item "):
            out.setdefault(m.group(1), set()).update(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", m.group(2)))
    return out


def test_the_checklist_runs_every_stage_through_known_scripts():
    commands = _checklist_commands()
    assert set(commands) == {"decompose", "forward", "rom", "harness_efficiency", "reload", "moe", "gradient_pass"}
    assert "--layers" in commands["forward"] and "--synthetic-layers" in commands["reload"]  # the smoke mode's arrays
    r = subprocess.run(["bash", str(CHECKLIST), "9"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "unknown stage 9" in r.stderr


@pytest.mark.parametrize("script", sorted(_checklist_commands()))
def test_every_flag_of_the_checklist_exists(script):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--help"], capture_output=True, text=True, cwd=ROOT / "benchmarks")
    assert r.returncode == 0, r.stderr[-2000:]
    known = set(re.findall(r"(--[a-z][\w-]*)", r.stdout))
    wanted = _checklist_commands()[script]
    assert wanted <= known, f"{script}.py lacks {sorted(wanted - known)}"


def test_moe_benchmark_runs_at_toy_size():
    """benchmarks/moe.py calls the decomposition internals directly: a signature change must not break it unseen."""
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "moe.py"), "--hidden", "64", "--inter", "96", "--tokens", "64", "--cuts", "0.3", "--reps", "1", "--threads", "1", "--decompose-ranks", "2"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.search(r"^rank \d+: parameter cut 0\.\d+, latency cut vs dense grouped_mm -?\d", r.stdout, re.M), r.stdout
    assert re.search(r"^rank \d+: factored grouped GEMMs / factored loop: \d", r.stdout, re.M), r.stdout
    assert re.search(r"^decompose 16 expert matrices at rank 2: [\d.]+ s, full SVD of the same [\d.]+ s", r.stdout, re.M), r.stdout


def test_reload_benchmark_runs_on_a_synthetic_model_without_the_on_load_round(tmp_path):
    """reload.py builds its model with _synthetic.save_random_model and, with --skip-on-load, times only the dense,
    checkpoint and cache-hit loads."""
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "reload.py"), "--synthetic", "smollm2-135m", "--synthetic-layers", "1", "--rank", "4",
         "--repeats", "1", "--skip-on-load", "--workdir", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "decompose_on_load=skipped" in r.stdout and "checkpoint_load / decompose_on_load" not in r.stdout, r.stdout
    assert re.search(r"^cache_hit_load / dense_load = \d+\.\d+ \(target <= 1\.2\)", r.stdout, re.M), r.stdout


@pytest.mark.slow
def test_shared_solves_benchmark_runs_at_toy_size():
    """benchmarks/shared_solves.py starts its own gloo processes and calls compress_model with a ProcessShard."""
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "shared_solves.py"), "--configs", "rank=1,layers=1|2", "--reps", "1"],
        capture_output=True, text=True, cwd=ROOT, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.search(r"^shared solves 'rank=1,layers=1\|2': shared [\d.]+ s .* shared / alone \d+\.\d+ .*same factors both ways: True$", r.stdout, re.M), r.stdout


def test_gradient_pass_benchmark_runs_on_a_tiny_model_and_both_passes_agree(tiny_llama_dir, benchmark_data):
    """benchmarks/gradient_pass.py times the batched gradient pass against the per-sequence one; the figure it
    prints after the timings is how far apart their Fisher sums are. With --checkpoint each pass also runs with its
    layers recomputed, and says whether the sums came out the same."""
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gradient_pass.py"), "--model", str(tiny_llama_dir), "--n", "5", "--len", "16", "--batch", "2", "3",
         "--repeats", "2", "--threads", "1", "--checkpoint"],
        capture_output=True, text=True, cwd=ROOT, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.search(r"^gradient pass per sequence: [\d.]+ s", r.stdout, re.M), r.stdout
    differences = [float(d) for d in re.findall(r"^gradient pass batch [23]: [\d.]+ s, speedup [\d.]+x over per sequence; largest relative difference of f ([\d.e+-]+)$", r.stdout, re.M)]
    assert len(differences) == 2 and max(differences) < 1e-4, r.stdout
    recomputed = re.findall(r"^gradient pass batch ([123]) with layers recomputed: [\d.]+ s, [\d.]+x \[[\d.]+\.\.[\d.]+\] the plain pass's time \(per round\); the same sums bit for bit: (\w+)$", r.stdout, re.M)
    assert recomputed == [("1", "yes"), ("2", "yes"), ("3", "yes")], r.stdout


def test_gradient_pass_benchmark_compares_torchs_half_kernels(tiny_llama_dir, benchmark_data):
    """--native-half times the pass of a bf16 model with its linears in fp32 against torch's own bf16 kernels on a
    CPU that runs those slowly, with how far apart the sums are; elsewhere it says there is nothing to compare."""
    from lm_eval_lowrank.half_backward import slow_half_products

    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gradient_pass.py"), "--model", str(tiny_llama_dir), "--n", "3", "--len", "16", "--batch", "2",
         "--repeats", "1", "--threads", "1", "--dtype", "bfloat16", "--native-half"],
        capture_output=True, text=True, cwd=ROOT, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    if not slow_half_products(torch.bfloat16):
        assert "already runs torch's own kernels (nothing to compare)" in r.stdout, r.stdout
        return
    found = re.findall(r"^gradient pass batch ([12]) in bfloat16: linears in fp32 [\d.]+ s, torch's own kernels [\d.]+ s, speedup [\d.]+x; largest relative difference of f ([\d.e+-]+)$", r.stdout, re.M)
    assert [b for b, _ in found] == ["1", "2"] and all(float(d) < 0.1 for _, d in found), r.stdout


def test_gradient_pass_benchmark_counts_what_a_batch_holds(tiny_llama_dir, benchmark_data):
    """--held prints grad_checkpoint=auto's count for one batch of each size and length; with no timings asked
    for (--repeats 0) it prints only that. What a batch holds grows with its tokens."""
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gradient_pass.py"), "--model", str(tiny_llama_dir), "--n", "2", "--len", "16", "32",
         "--batch", "2", "--repeats", "0", "--threads", "1", "--held"],
        capture_output=True, text=True, cwd=ROOT, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "gradient pass per sequence" not in r.stdout
    held = re.findall(r"^held for the backward, (\d+) tokens, batch (\d): ([\d.]+) MiB, ([\d.]+) KiB a token a layer$", r.stdout, re.M)
    assert [(t, b) for t, b, _, _ in held] == [("16", "1"), ("16", "2"), ("32", "1"), ("32", "2")], r.stdout
    mib = [float(m) for _, _, m, _ in held]
    assert 0 < mib[0] < mib[1] < mib[3] and mib[0] < mib[2] < mib[3], r.stdout
    # per token and layer, a tiny model (64 wide) holds some tens of vectors of 64 floats: 2.5-10 KiB
    assert all(2.5 < float(k) < 10 for _, _, _, k in held), r.stdout


def test_decompose_benchmark_runs_on_one_smollm2_layer(smollm2_dir):
    """benchmarks/decompose.py reaches into the solver pool and the Gram solver's parts: run it small."""
    r = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "decompose.py"), "--model", str(smollm2_dir), "--layers", "1", "--ranks", "1", "64",
         "--reps", "1", "--threads", "2", "--serial-gram", "--floor"],
        capture_output=True, text=True, cwd=ROOT / "benchmarks", timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.search(r"^decompose smollm2 rank=64: ours [\d.]+ s, full SVD [\d.]+ s, speedup [\d.]+x .*\[solvers gram:7\]$", r.stdout, re.M), r.stdout
    assert re.search(r"^decompose smollm2 rank=64: Gram solves in parallel threads [\d.]+ s, one at a time [\d.]+ s", r.stdout, re.M), r.stdout
    assert re.search(r"^floor smollm2 rank=64: the same in 2 threads [\d.]+ s", r.stdout, re.M), r.stdout
    # The Krylov stops at rank 1: knowing the answer stops first, the gap-aware bounds (the least of three, one of
    # them the solver's own residual bound) no later than the solver's certificate.
    dims = dict(re.findall(r"^floor smollm2 rank=1: passes alone at the ([\w-]+) Krylov dimension \(mean (\d+)\)", r.stdout, re.M))
    assert set(dims) == {"hindsight", "certified", "gap-certified"}, r.stdout
    assert 0 < int(dims["hindsight"]) <= int(dims["gap-certified"]) <= int(dims["certified"]), r.stdout


def _cgroup_writable() -> bool:
    v1, v2 = Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup")
    if (v1 / "memory.limit_in_bytes").exists():
        return os.access(v1, os.W_OK)
    control = v2 / "cgroup.subtree_control"
    return control.exists() and "memory" in control.read_text().split() and os.access(v2, os.W_OK)


@pytest.mark.skipif(not _cgroup_writable(), reason="needs a writable memory cgroup tree (root)")
def test_memory_limit_benchmark_kills_or_finishes_in_a_cgroup(tiny_llama_dir):
    """benchmarks/memory_limit.py runs each way in a fresh memory cgroup: under a limit below what python and torch
    need, the plain pass is killed; under a roomy one, auto finishes plain with the unlimited run's sums."""
    def run(limit: str, mode: str) -> str:
        r = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "memory_limit.py"), "--model", str(tiny_llama_dir), "--len", "32", "--limit-gib", limit, "--modes", mode],
            capture_output=True, text=True, cwd=ROOT, timeout=300,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]
        assert re.search(r"^no limit \[false\]: [\d.]+ s, peak RSS \d+ MiB$", r.stdout, re.M), r.stdout
        return r.stdout

    assert re.search(r"^memory limit 0.15 GiB \[false\]: killed \(out of memory\)$", run("0.15", "false"), re.M)
    roomy = run("4", "auto")
    assert re.search(r"^memory limit 4 GiB \[auto\]: finished in [\d.]+ s, peak RSS \d+ MiB, layers checkpointed: False, counted [\d.]+ GiB held "
                     r"against a budget of [\d.]+ GiB; the same sums as without a limit, bit for bit: yes$", roomy, re.M), roomy  # fmt: skip
    assert not list(Path("/sys/fs/cgroup/memory" if Path("/sys/fs/cgroup/memory").exists() else "/sys/fs/cgroup").glob("lowrank-bench-*"))  # removed


def test_moe_benchmark_reports_the_path_use_grouped_experts_takes_where_the_kernel_pays(monkeypatch, capsys):
    """The timing rounds left the config at 'eager' and the check ran with grad enabled: the line always read 'the
    loop', even where grouped GEMMs run (an SM80+ GPU, stood in for here)."""
    import importlib

    import lm_eval_lowrank.modules as modules

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    moe = importlib.import_module("moe")
    monkeypatch.setattr(modules, "grouped_kernel_pays", lambda device: True)
    monkeypatch.setattr(modules, "GROUPED_REFUSED", set())
    monkeypatch.setattr(sys, "argv", ["moe.py", "--hidden", "64", "--inter", "96", "--tokens", "64", "--cuts", "0.3", "--reps", "1", "--threads", "1"])
    moe.main()
    assert "use_grouped_experts picks grouped GEMMs here" in capsys.readouterr().out


def test_forward_benchmark_counts_the_tucker_core_in_the_parameter_ratio(monkeypatch, capsys):
    import argparse
    import importlib

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    forward = importlib.import_module("forward")
    monkeypatch.setattr(forward, "SHAPES", [(96, 64)])
    forward.bench_modules(argparse.Namespace(module_ranks=[16], module_reps=1, inner=1), 8, torch.float32, torch.device("cpu"))
    lines = {line.split(":")[0]: line for line in capsys.readouterr().out.splitlines()}
    assert lines["module 96x64 folded rank=16"].endswith(f"(param ratio {96 * 64 / (16 * 160):.2f}x)")
    assert lines["module 96x64 tucker rank=16"].endswith(f"(param ratio {96 * 64 / (16 * 160 + 16 * 16):.2f}x)")
