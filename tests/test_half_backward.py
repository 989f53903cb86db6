"""Half-precision linears with gradients formed in fp32 (half_backward): the values of autograd's own
half-precision linear, from kernels a CPU without native bf16/fp16 GEMM runs fast."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lm_eval_lowrank import half_backward


@pytest.fixture
def slow_cpu(monkeypatch):
    """This CPU taken as one that multiplies half precision slowly (as AVX2 machines do), whatever it measures."""
    monkeypatch.setitem(half_backward._SLOW, torch.bfloat16, True)
    monkeypatch.setitem(half_backward._SLOW, torch.float16, True)


def _bits_apart(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest difference, in units of the half dtype's spacing at b's magnitude."""
    spacing = torch.finfo(b.dtype).eps * b.float().abs().clamp_min(torch.finfo(b.dtype).tiny)
    return float(((a.float() - b.float()).abs() / spacing).max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_in_fp32_gives_autograds_half_precision_values(dtype):
    """Output and the three gradients as a half-precision GEMM forms them (fp32 sums, one rounding): within one
    unit of the last place of autograd's own, for a 3-D input, and closer to the fp64 truth."""
    gen = torch.Generator().manual_seed(0)
    x64, w64, b64 = torch.randn(2, 7, 48, generator=gen, dtype=torch.float64), torch.randn(40, 48, generator=gen, dtype=torch.float64), torch.randn(40, generator=gen, dtype=torch.float64)
    g = torch.randn(2, 7, 40, generator=gen).to(dtype)

    def run(linear):
        x, w, b = (t.to(dtype).requires_grad_(True) for t in (x64, w64, b64))
        y = linear(x, w, b)
        y.backward(g)
        return y.detach(), x.grad, w.grad, b.grad

    ours = run(half_backward._LinearInFp32.apply)
    native = run(F.linear)
    for a, n in zip(ours, native):
        assert a.dtype == dtype and a.shape == n.shape
        assert _bits_apart(a, n) <= 1.0
    # The forward is x W^T + b in fp32, rounded once
    exact = (x64.to(dtype).double() @ w64.to(dtype).double().T + b64.to(dtype).double())
    assert _bits_apart(ours[0], exact.to(dtype)) <= 1.0


def test_only_linears_taking_a_gradient_on_a_slow_cpu_run_in_fp32(slow_cpu):
    """Within linears_in_fp32: F.linear (nn.Linear's forward) with a gradient to take runs through the fp32
    function; one without (no_grad, or nothing requires grad) keeps torch's own kernel. An fp32 model and a CPU
    fast at half precision are left alone."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(16, 8).to(torch.bfloat16)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    with half_backward.linears_in_fp32(lin) as applies:
        assert applies
        assert type(lin(x.requires_grad_(True)).grad_fn).__name__ == "_LinearInFp32Backward"
        with torch.no_grad():
            assert lin(x).grad_fn is None
        for p in lin.parameters():
            p.requires_grad_(False)
        assert lin(x.detach()).grad_fn is None
        assert type(lin(x.detach().requires_grad_(True)).grad_fn).__name__ == "_LinearInFp32Backward"
    assert type(lin(x.detach().requires_grad_(True)).grad_fn).__name__ != "_LinearInFp32Backward"  # the mode is gone
    with half_backward.linears_in_fp32(torch.nn.Linear(16, 8)) as applies:
        assert not applies
    half_backward._SLOW[torch.bfloat16] = False
    with half_backward.linears_in_fp32(lin) as applies:
        assert not applies


@pytest.mark.parametrize("fp32_seconds, half_seconds, slow", [(1, 10, True), (10, 1, False)])
def test_slow_half_products_is_measured_once_per_dtype(monkeypatch, fp32_seconds, half_seconds, slow):
    """The probe takes the best of 3 timed runs each way (fp32 first, then half precision) once per dtype, and
    says slow when fp32 wins; fp32 itself is never probed."""
    monkeypatch.setattr(half_backward, "_SLOW", {})
    clock = [0.0]
    steps = [fp32_seconds] * 3 + [half_seconds] * 3
    reads = []

    def perf_counter() -> float:
        reads.append(1)
        if len(reads) % 2 == 0:  # the end of a run: one step of the script later
            clock[0] += steps[len(reads) // 2 - 1]
        return clock[0]

    monkeypatch.setattr(half_backward.time, "perf_counter", perf_counter)
    assert half_backward.slow_half_products(torch.bfloat16) is slow
    assert len(reads) == 12 and half_backward.slow_half_products(torch.bfloat16) is slow and len(reads) == 12
    assert half_backward.slow_half_products(torch.float32) is False and set(half_backward._SLOW) == {torch.bfloat16}


@pytest.mark.parametrize("batch_size", [1, 2])
def test_gradient_pass_of_a_bf16_model_on_a_slow_cpu(tiny_llama, slow_cpu, monkeypatch, batch_size):
    """The Fisher pass of a bf16 model with its linears (and the chunked head) in fp32: the sums of torch's own
    bf16 kernels, to bf16's round-off, and the report says which ran."""
    from lm_eval_lowrank import calibration

    model = tiny_llama.to(torch.bfloat16)
    ids = torch.randint(0, 128, (3, 11), generator=torch.Generator().manual_seed(5))
    paths = ["model.layers.1.self_attn.v_proj", "model.layers.1.mlp.gate_proj", "model.layers.3.self_attn.o_proj"]
    calls: list[int] = []
    apply = half_backward._LinearInFp32.apply
    monkeypatch.setattr(half_backward._LinearInFp32, "apply", staticmethod(lambda *a: (calls.append(1), apply(*a))[1]))

    def run() -> tuple[dict[str, torch.Tensor], dict, int]:
        report: dict = {}
        calls.clear()
        sums, _ = calibration.fisher_row_sums(model, paths, ids, batch_size=batch_size, checkpoint_layers=False, report=report)
        return sums, report, len(calls)

    ours, report, fp32_calls = run()
    monkeypatch.setitem(half_backward._SLOW, torch.bfloat16, False)
    native, native_report, native_calls = run()
    # Every linear the backward passes through a batch: v, o, gate, up and down of layer 2 (the graph starts at
    # v's own input: q and k take no gradient) and all 7 of layers 3 and 4
    assert report["linears_in_fp32"] is True and fp32_calls == (5 + 7 + 7) * len(range(0, 3, batch_size))
    assert native_report["linears_in_fp32"] is False and native_calls == 0
    for p in paths:
        assert float(ours[p].min()) > 0
        torch.testing.assert_close(ours[p], native[p], rtol=0.05, atol=0)  # bf16 carries 8 bits: a few roundings apart
