"""Data-parallel processes split the solves (ProcessShard): two gloo processes on the CPU.

Each process builds the same model, decomposes it with ``shard=ProcessShard.create()`` and reports the sha256 of
its factors. Checks: both processes end with the factors a single process computes (bit for bit) for tucker, rom
and mixture-of-experts projections, the work was split, a process whose cache differs decomposes on its own
instead of waiting, and a failed solve raises in every process instead of leaving the others waiting.
"""

from __future__ import annotations

import multiprocessing as mp
import socket
import sys
from pathlib import Path

import pytest
import torch

from conftest import save_tiny_llama

TUCKER = {"rank": "2|q:1", "layers": "all", "cache": False}  # rank 1: single-column factors, of any stride
# 4 calibration batches: each process runs 2 and the sums are added over processes in another order than one
# process adds them, so rom's factors match a single process's to round-off, not bit for bit.
ROM = {"rank": 2, "layers": "2|4", "method": "rom", "calib_n": 32, "calib_len": 32, "calib_batch": 8, "cache": False}
EXPERTS = {"rank": 2, "layers": "all", "tensors": "q_proj|experts.gate_up_proj|experts.down_proj", "cache": False}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mixtral(vocab_size: int = 64):
    import transformers

    config = transformers.AutoConfig.for_model(
        "mixtral", hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size,
        head_dim=8, num_experts_per_tok=2, intermediate_size=40, num_local_experts=4,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "experts" in name:
                p.normal_(0, 0.2)
    return model


def _load(folder: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)


def _decompose(scenario: str, folder: str, shard) -> dict:
    from lm_eval_lowrank.api import compress_model
    from lm_eval_lowrank.decompose import factors_digest
    from lm_eval_lowrank.modules import LowRankExpertWeights, LowRankLinear

    if scenario == "experts":
        model, tok, spec, model_id = _mixtral(), None, EXPERTS, None
    elif scenario == "experts_rom":  # per-expert statistics over each process's routed tokens, summed
        model, tok, model_id = _mixtral(vocab_size=49152), _load(folder)[1], None
        spec = {**EXPERTS, **{k: v for k, v in ROM.items() if k.startswith("calib")}, "method": "rom"}
    else:
        model, tok = _load(folder)
        # whiten fits a blend with the dense model's outputs (calib_target 0.25): the cross sums are split too
        budgets = {k: {**ROM, "budget": 0.6, "allocator": k, "rank": None} for k in ("output_error", "sensitivity", "fisher")}
        gradients = {m: {**ROM, "method": m} for m in ("fwsvd", "fwhiten")}  # the gradient pass's sequences are split too
        # the Fisher row-sum cache: seeded with layer 2's modules in rank 0's cache only, then layers 2 and 4
        gradients["fisher_cache_seed"] = {**ROM, "method": "fwsvd", "cache": True, "layers": "2"}
        gradients["fisher_cache_split"] = {**ROM, "method": "fwsvd", "cache": True}
        spec = {"rom": ROM, "whiten": {**ROM, "method": "whiten"}, "asvd": {**ROM, "method": "asvd"}, "cache_split": {**TUCKER, "cache": True}, **budgets, **gradients}.get(scenario, TUCKER)
        model_id = folder if scenario == "cache_split" else None
    report = compress_model(model, spec, tokenizer=tok, model_id=model_id, progress=False, shard=shard)
    products = {n: (m.last @ m.first).detach() for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    products.update({n: (m.last @ m.first).detach() for n, m in model.named_modules() if isinstance(m, LowRankExpertWeights)})
    return {
        "digest": factors_digest(model),
        "shared": report.shared_solves,
        "cache_hit": bool((report.cache or {}).get("hit")),
        "calibration_shared": (report.calibration or {}).get("shared"),
        "fisher_shared": ((report.calibration or {}).get("fisher") or {}).get("shared"),
        "calibration_cache": (report.calibration or {}).get("cache"),
        "products": products,
    }


def _sum_keys(rank: int, shard) -> dict:
    """The calibration sums of two processes whose keys differ (an expert that only one process's tokens reach)."""
    from types import SimpleNamespace

    from lm_eval_lowrank.calibration import SequentialStatsProvider

    accum = {"x": torch.full((2, 2), 1.0 + rank, dtype=torch.float64), f"e#{rank}": torch.full((2, 2), 10.0 + rank, dtype=torch.float64)}
    experts, small = {f"e#{rank}": 3 + rank}, {"x": [1.0, 4.0 + rank]}
    absum = {"x": torch.full((2,), 0.5 + rank, dtype=torch.float64), f"e#{rank}": torch.full((2,), 5.0 + rank, dtype=torch.float64)}
    tokens = SequentialStatsProvider._sum_over_processes(SimpleNamespace(shard=shard), accum, None, 8 + rank, experts, small, absum)
    return {"tokens": tokens, "accum": accum, "experts": experts, "small": small, "absum": absum}


def _worker(rank: int, port: int, folder: str, caches: list[str], out: str) -> None:
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    from lm_eval_lowrank import methods
    from lm_eval_lowrank.decompose import ProcessShard

    results = {"sum_keys": _sum_keys(rank, ProcessShard.create())}
    for scenario in ("tucker", "rom", "whiten", "asvd", "fwsvd", "fwhiten", "experts", "experts_rom", "output_error", "sensitivity", "fisher", "cache_split", "fisher_cache_split", "failure"):
        os.environ["LM_EVAL_LOWRANK_CACHE"] = caches[rank]  # only the *cache_split scenarios read it: rank 0's holds entries
        if scenario == "failure" and rank == 1:
            methods._load_builtin()
            tucker = methods._REGISTRY["tucker"]

            def refuse_wide(W, r, stats, **kw):
                if W.shape[0] > 64:
                    raise RuntimeError("boom on a wide matrix")
                return tucker(W, r, stats, **kw)

            methods._REGISTRY["tucker"] = refuse_wide
        try:
            results[scenario] = _decompose(scenario, folder, ProcessShard.create())
        except Exception as exc:
            results[scenario] = {"error": f"{type(exc).__name__}: {exc}"}
    torch.save(results, Path(out, f"{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, smollm2_dir):
    """Both workers' results, and the same decompositions by this one process (one thread, as they run)."""
    tmp = tmp_path_factory.mktemp("shared_solves")
    folder = str(save_tiny_llama(tmp / "tiny", smollm2_dir, num_hidden_layers=4, max_position_embeddings=256))
    caches = [str(tmp / "cache0"), str(tmp / "cache1")]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        solo = {s: _decompose(s, folder, None) for s in ("tucker", "rom", "whiten", "asvd", "fwsvd", "fwhiten", "experts", "experts_rom", "output_error", "sensitivity", "fisher")}
        import os

        old = os.environ.get("LM_EVAL_LOWRANK_CACHE")
        os.environ["LM_EVAL_LOWRANK_CACHE"] = caches[0]
        try:
            solo["cache_split"] = _decompose("cache_split", folder, None)  # writes rank 0's cache entry
            solo["fisher_cache_seed"] = _decompose("fisher_cache_seed", folder, None)  # layer 2's row sums, rank 0's only
        finally:
            if old is None:
                os.environ.pop("LM_EVAL_LOWRANK_CACHE")
            else:
                os.environ["LM_EVAL_LOWRANK_CACHE"] = old
    finally:
        torch.set_num_threads(before)
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, folder, caches, str(tmp))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "a process was still waiting (deadlock in the shared solves)"
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return solo, [torch.load(tmp / f"{r}.pt") for r in range(2)]


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.skipif(sys.platform != "linux", reason="gloo over TCP on localhost")
# output_error, sensitivity and fisher: budget allocators whose calibrated passes come before the decomposition
@pytest.mark.parametrize("scenario", ["tucker", "rom", "whiten", "asvd", "fwsvd", "fwhiten", "experts", "experts_rom", "output_error", "sensitivity", "fisher"])
def test_shared_solves_give_one_process_factors(two_processes, scenario):
    solo, (r0, r1) = two_processes
    assert solo[scenario]["digest"] is not None
    assert r0[scenario]["digest"] == r1[scenario]["digest"]  # every process holds the same factors
    # the gradient pass runs one sequence at a time: 16 of the 32 in each process
    by_sequence = {"processes": 2, "batches_per_process": [16, 16]}
    assert r0[scenario]["fisher_shared"] == (by_sequence if scenario in ("fwhiten", "fisher") else None)
    if scenario != "tucker" and scenario != "experts":  # calibration batches split: the sums differ from one process's in round-off only
        assert r0[scenario]["calibration_shared"] == (by_sequence if scenario == "fwsvd" else {"processes": 2, "batches_per_process": [2, 2]})
        assert r0[scenario]["products"].keys() == solo[scenario]["products"].keys()
        for name, product in solo[scenario]["products"].items():
            torch.testing.assert_close(r0[scenario]["products"][name], product, rtol=1e-4, atol=1e-5, msg=name)
    else:  # the very factors one process computes
        assert r0[scenario]["digest"] == solo[scenario]["digest"]
    shared = r0[scenario]["shared"]
    per_process = shared["modules_per_process"]
    assert shared["processes"] == 2 and r1[scenario]["shared"]["modules_per_process"] == per_process
    assert min(per_process) > 0, f"one process solved nothing: {per_process}"
    # one job per module; per expert for stacked experts (2 layers: q_proj + 4 experts x 2 projections)
    jobs = 2 * (1 + 2 * 4) if "experts" in scenario else len(solo[scenario]["products"])
    assert sum(per_process) == jobs


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.skipif(sys.platform != "linux", reason="gloo over TCP on localhost")
def test_a_process_with_another_cache_decomposes_alone(two_processes):
    solo, (r0, r1) = two_processes
    assert r0["cache_split"]["cache_hit"] and not r1["cache_split"]["cache_hit"]
    assert r1["cache_split"]["shared"] is None  # decomposed on its own, not waiting for rank 0's share
    assert r0["cache_split"]["digest"] == r1["cache_split"]["digest"] == solo["cache_split"]["digest"]


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.skipif(sys.platform != "linux", reason="gloo over TCP on localhost")
def test_a_failed_solve_raises_in_every_process(two_processes):
    _, (r0, r1) = two_processes
    assert r1["failure"]["error"] == "RuntimeError: boom on a wide matrix"
    assert r0["failure"]["error"] == "RuntimeError: process 1 failed decomposing: RuntimeError: boom on a wide matrix"


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.skipif(sys.platform != "linux", reason="gloo over TCP on localhost")
def test_calibration_sums_add_up_over_processes_whose_keys_differ(two_processes):
    _, (r0, r1) = two_processes
    for r in (r0, r1):
        got = r["sum_keys"]
        assert got["tokens"] == 8 + 9
        assert sorted(got["accum"]) == ["e#0", "e#1", "x"]
        torch.testing.assert_close(got["accum"]["x"], torch.full((2, 2), 3.0, dtype=torch.float64))
        torch.testing.assert_close(got["accum"]["e#0"], torch.full((2, 2), 10.0, dtype=torch.float64))  # zeros where absent
        torch.testing.assert_close(got["accum"]["e#1"], torch.full((2, 2), 11.0, dtype=torch.float64))
        assert got["experts"] == {"e#0": 3, "e#1": 4}
        assert got["small"] == {"x": [2.0, 9.0]}
        # the mean |x| sums (asvd) follow the same keys, and are zero where a process had none
        torch.testing.assert_close(got["absum"]["x"], torch.full((2,), 2.0, dtype=torch.float64))
        torch.testing.assert_close(got["absum"]["e#0"], torch.full((2,), 5.0, dtype=torch.float64))
        torch.testing.assert_close(got["absum"]["e#1"], torch.full((2,), 6.0, dtype=torch.float64))


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.skipif(sys.platform != "linux", reason="gloo over TCP on localhost")
def test_decompose_cli_under_torchrun_writes_the_one_process_checkpoint(tmp_path, smollm2_dir):
    """`torchrun --nproc_per_node 2 --no-python lm-eval-lowrank decompose …`: the processes share the solves and the
    first one writes the checkpoint, the same bytes as one process writes."""
    import os
    import subprocess

    folder = save_tiny_llama(tmp_path / "tiny", smollm2_dir, num_hidden_layers=3, max_position_embeddings=256)
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    args = ["decompose", "--model_args", f"pretrained={folder},rank=2,cache=false", "--quiet"]
    one = subprocess.run([str(bin_dir / "lm-eval-lowrank"), *args, "--out", str(tmp_path / "one")], env=env, capture_output=True, text=True, timeout=200)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run(
        [str(bin_dir / "torchrun"), "--nproc_per_node", "2", "--master_port", str(_free_port()), "--no-python", "lm-eval-lowrank", *args, "--out", str(tmp_path / "two")],
        env=env, capture_output=True, text=True, timeout=200,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("saved ") == 1 and "solves shared by 2 processes" in two.stdout, two.stdout
    name = "lowrank_model.safetensors"
    assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.skipif(sys.platform != "linux", reason="gloo over TCP on localhost")
def test_processes_whose_fisher_caches_differ_compute_the_same_modules(two_processes):
    """Rank 0's cache holds layer 2's row sums, rank 1's none: both compute every module of layers 2 and 4 together
    (the union of what each lacks), or their all-reduces would not match."""
    solo, (r0, r1) = two_processes
    assert solo["fisher_cache_seed"]["calibration_cache"]["misses"] == 7
    a, b = r0["fisher_cache_split"], r1["fisher_cache_split"]
    assert "error" not in a and "error" not in b, (a, b)
    assert a["digest"] == b["digest"]
    assert a["calibration_cache"]["misses"] == b["calibration_cache"]["misses"] == 14 and a["calibration_cache"]["hits"] == 0
    assert a["calibration_shared"] == {"processes": 2, "batches_per_process": [16, 16]}
    for name, product in solo["fwsvd"]["products"].items():
        torch.testing.assert_close(a["products"][name], product, rtol=1e-4, atol=1e-5, msg=name)
