"""The paths that only a CUDA GPU takes, run for real: skipped on a machine without one.

`benchmarks/gpu_checklist.sh 7` runs this file on a lent GPU. Here (no GPU) every test is skipped, so the rest of
the suite never needs one; the same code paths are exercised on the CPU elsewhere with the kernel choice forced.
"""

from __future__ import annotations

import copy

import pytest
import torch

from lm_eval_lowrank.api import compress_model
from test_moe import EXPERTS, _experts, _model, _spy

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu_checklist.sh 7)")

IDS = torch.randint(0, 64, (4, 33), generator=torch.Generator().manual_seed(7))


def _tolerance(dtype: torch.dtype) -> dict[str, float]:
    return {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 3e-2, "atol": 3e-2}


def _decomposed_moe(rank: int = 8):
    # 16 experts, top-4: every expert is routed some tokens of IDS
    model = _model("qwen3_moe", hidden_size=128, moe_intermediate_size=64, head_dim=32, num_experts=16, num_experts_per_tok=4)
    compress_model(model, {"rank": rank, "tensors": EXPERTS}, progress=False)
    return model


@pytest.fixture
def fresh_grouped_checks(monkeypatch):
    """The grouped forward's check runs again in each test, on this GPU."""
    import lm_eval_lowrank.modules as modules

    monkeypatch.setattr(modules, "GROUPED_REFUSED", {})
    monkeypatch.setattr(modules, "GROUPED_PASSED", set())
    return modules


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_experts_run_on_this_gpu_and_equal_the_loop(dtype, fresh_grouped_checks, monkeypatch):
    modules = fresh_grouped_checks
    device = torch.device("cuda")
    if not modules.grouped_kernel_pays(device):
        pytest.skip("grouped GEMMs are picked at SM 8.0+ only")
    model = _decomposed_moe().to(device=device, dtype=dtype)
    runs = []
    monkeypatch.setattr(modules, "_grouped_experts_forward", _spy(modules._grouped_experts_forward, runs))
    with torch.no_grad():
        grouped = model(IDS.to(device)).logits
        assert runs, "the grouped forward did not run"
        assert ("cuda", dtype) in modules.GROUPED_PASSED and not modules.GROUPED_REFUSED  # its check, at the first forward
        assert modules.experts_forward_path(model) == {"path": "grouped_gemm"}
        monkeypatch.setattr(modules, "use_grouped_experts", lambda *_: False)  # the same model through the loop
        looped = model(IDS.to(device)).logits
    torch.testing.assert_close(grouped.float(), looped.float(), **_tolerance(dtype))


def test_experts_offloaded_to_the_cpu_run_on_the_gpu_like_resident_ones(fresh_grouped_checks):
    """accelerate's cpu_offload with the GPU as execution device: weights rest on the meta device, the forward runs
    on the GPU, and the grouped forward is checked there at the first forward."""
    import accelerate

    modules = fresh_grouped_checks
    device = torch.device("cuda")
    model = _decomposed_moe()
    with torch.no_grad():
        expected = copy.deepcopy(model).to(device)(IDS.to(device)).logits
    offloaded = accelerate.cpu_offload(model, execution_device=device)
    assert modules.execution_device(_experts(offloaded)) == device
    with torch.no_grad():
        got = offloaded(IDS.to(device)).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    path = "grouped_gemm" if modules.grouped_kernel_pays(device) else "loop"
    assert modules.experts_forward_path(offloaded) == {"path": path}


def test_a_checkpoint_dispatched_over_the_gpu_and_the_cpu_equals_one_on_the_gpu(tmp_path):
    from lm_eval_lowrank.checkpoint import load_compressed, save_compressed

    model = _model("mixtral")
    report = compress_model(model, {"rank": 4, "tensors": EXPERTS + "|q_proj|o_proj"}, progress=False)
    save_compressed(model, tmp_path / "ckpt", report)
    on_gpu = load_compressed(tmp_path / "ckpt", device="cuda")
    device_map = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu", "model.norm": 0, "model.rotary_emb": 0, "lm_head": 0}
    spread = load_compressed(tmp_path / "ckpt", device_map=device_map)
    assert next(spread.model.layers[1].parameters()).is_meta  # offloaded, run on the GPU
    with torch.no_grad():
        torch.testing.assert_close(spread(IDS.cuda()).logits, on_gpu(IDS.cuda()).logits, rtol=1e-4, atol=1e-4)


def test_greedy_decoding_with_grouped_experts_picks_the_loops_tokens(fresh_grouped_checks, monkeypatch):
    """Decoding runs the experts one token at a time (the launch-bound case the grouped path is for), through the
    KV cache; in fp32 its greedy tokens are the loop's."""
    modules = fresh_grouped_checks
    device = torch.device("cuda")
    if not modules.grouped_kernel_pays(device):
        pytest.skip("grouped GEMMs are picked at SM 8.0+ only")
    model = _decomposed_moe().to(device)
    prompt = IDS[:2, :9].to(device)
    with torch.no_grad():
        grouped = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert modules.experts_forward_path(model) == {"path": "grouped_gemm"}
        monkeypatch.setattr(modules, "use_grouped_experts", lambda *_: False)
        looped = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(grouped, looped)


def test_decompose_cli_with_two_processes_on_the_gpu_writes_one_process_factors(tmp_path):
    """`torchrun --nproc_per_node 2 … decompose … device=cuda` (both processes on this GPU when there is one): the
    factors equal those of one process on the GPU."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    from test_checkpoint import make_tiny_dir

    make_tiny_dir(tmp_path / "tiny")  # with a word-level tokenizer: no SmolLM2 needed on the GPU machine
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    args = ["decompose", "--model_args", f"pretrained={tmp_path / 'tiny'},rank=4,cache=false,device=cuda", "--quiet"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runs = {
        "one": [str(bin_dir / "lm-eval-lowrank"), *args, "--out", str(tmp_path / "one")],
        "two": [str(bin_dir / "torchrun"), "--nproc_per_node", "2", "--master_port", str(port), "--no-python", "lm-eval-lowrank", *args, "--out", str(tmp_path / "two")],
    }
    for name, cmd in runs.items():
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, (name, r.stderr[-3000:])
    one, two = (load_file(str(tmp_path / n / "lowrank_model.safetensors")) for n in ("one", "two"))
    assert one.keys() == two.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("method", ["asvd", "whiten", "rom", "fwsvd", "fwhiten"])
def test_calibrated_methods_on_a_gpu_weight_give_the_cpus_factors(method):
    """A weight on the GPU with its statistics on the CPU (as decompose-on-load holds them): the same product as the
    CPU's, and the factors stay on the weight's device."""
    from lm_eval_lowrank.methods import LayerStats, get_method

    g = torch.Generator().manual_seed(0)
    W = torch.randn(96, 64, generator=g)
    X = torch.randn(500, 64, generator=g) * torch.logspace(1, -1, 64)
    stats = LayerStats((X.mT @ X / 500).double(), 500, None, X.abs().mean(0).double(), output_fisher=torch.logspace(1, -2, 96).double())
    cpu = get_method(method)(W, 8, stats, solver="exact")
    gpu = get_method(method)(W.to("cuda"), 8, stats, solver="exact")
    assert gpu.left.device.type == gpu.right.device.type == "cuda"
    torch.testing.assert_close(gpu.dense().cpu(), cpu.dense(), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("method", ["tucker", "whiten", "asvd", "fwsvd", "fwhiten"])
def test_allocator_curves_on_a_gpu_weight_equal_the_cpus(method):
    """output_error's and fisher's curves run on the weight's device (a 7B model's full decompositions take hours on
    a CPU) and come back on the CPU, equal to the CPU's."""
    from lm_eval_lowrank.allocation import error_tail, fisher_error_tail

    g = torch.Generator().manual_seed(0)
    W = torch.randn(96, 64, generator=g)
    X = torch.randn(400, 64, generator=g)
    C, f, abs_mean = (X.T @ X / 400).double(), torch.rand(96, generator=g).double() + 0.1, X.abs().mean(0)
    on_cpu = fisher_error_tail(W, C, f, method, None, abs_mean)
    on_gpu = fisher_error_tail(W.cuda(), C, f, method, None, abs_mean)
    assert on_gpu.device.type == "cpu"
    torch.testing.assert_close(on_gpu, on_cpu, rtol=1e-8, atol=1e-10 * float(on_cpu[0]))
    if method != "fwsvd" and method != "fwhiten":
        torch.testing.assert_close(error_tail(W.cuda(), C, method, None, abs_mean), error_tail(W, C, method, None, abs_mean), rtol=1e-8, atol=1e-10)


def test_gradient_pass_on_this_gpu_counts_what_it_holds_and_checkpoints_past_its_budget(monkeypatch):
    """The GPU's free memory moves with an allocation; the first batch's held bytes are real memory (at most what
    the pass allocated on the device); with no room grad_checkpoint=auto checkpoints and gives the same bits."""
    from transformers import LlamaForCausalLM

    from conftest import tiny_llama_config
    from lm_eval_lowrank import calibration

    device = torch.device("cuda")
    free = calibration.free_memory_bytes(device)
    assert 0 < free <= torch.cuda.get_device_properties(device).total_memory
    block = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    assert abs(free - calibration.free_memory_bytes(device) - (256 << 20)) <= 8 << 20
    del block

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(hidden_size=256, intermediate_size=640)).to(device).eval()
    ids = torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(5))
    paths = ["model.layers.1.self_attn.v_proj", "model.layers.3.mlp.down_proj"]
    plain, _ = calibration.fisher_row_sums(model, paths, ids, batch_size=2, checkpoint_layers=False)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    report: dict = {}
    auto, _ = calibration.fisher_row_sums(model, paths, ids, batch_size=2, report=report)
    assert report["checkpoint_layers"] is False and 0 < report["held_bytes_first_batch"] <= torch.cuda.max_memory_allocated(device) - base
    monkeypatch.setattr(calibration, "free_memory_bytes", lambda device: 2 * 4096)
    tight: dict = {}
    switched, _ = calibration.fisher_row_sums(model, paths, ids, batch_size=2, report=tight)
    assert tight["checkpoint_layers"] is True
    assert all(torch.equal(auto[p], plain[p]) and torch.equal(switched[p], plain[p]) for p in paths)
