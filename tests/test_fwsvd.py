"""Fisher-weighted SVD: the method as a tensor function, the gradient statistics, and the whole path."""

from __future__ import annotations

import math
import platform
import subprocess
import sys
import weakref

import pytest
import torch

from lm_eval_lowrank.methods import LayerStats, get_method
from lm_eval_lowrank.spec import FACTOR_FIELDS, DecompositionSpec, SpecError


def _fisher(f: torch.Tensor) -> LayerStats:
    return LayerStats(None, 100, output_fisher=f.double())


def _weighted_err(W: torch.Tensor, W_hat: torch.Tensor, f: torch.Tensor) -> float:
    return float((f.double().sqrt()[:, None] * (W.double() - W_hat.double())).square().sum())


@pytest.fixture
def weight():
    return torch.randn(48, 32, generator=torch.Generator().manual_seed(0))


def test_fwsvd_with_equal_row_weights_is_plain_svd(weight):
    fw, tucker = get_method("fwsvd"), get_method("tucker")
    for r in (1, 5, 16):
        assert torch.allclose(fw(weight, r, _fisher(torch.full((48,), 3.0)), solver="exact").dense(), tucker(weight, r, solver="exact").dense(), atol=1e-4)


def test_fwsvd_is_the_best_rank_r_fit_in_the_fisher_norm(weight):
    """||diag(sqrt f) (W - W_hat)||_F^2 is the tail of the weighted weight's spectrum (Eckart-Young), below plain
    SVD's; rows the loss ignores (f = 0) need no special case."""
    fw, tucker = get_method("fwsvd"), get_method("tucker")
    f = torch.logspace(2, -2, 48)
    f[40:] = 0.0  # dead outputs
    for r in (2, 8):
        got = fw(weight, r, _fisher(f), solver="exact")
        assert all(bool(torch.isfinite(t).all()) for t in (got.left, got.core, got.right))
        optimum = float(torch.linalg.svdvals(f.double().sqrt()[:, None] * weight.double())[r:].square().sum())
        assert _weighted_err(weight, got.dense(), f) == pytest.approx(optimum, rel=1e-4)
        assert _weighted_err(weight, got.dense(), f) < 0.8 * _weighted_err(weight, tucker(weight, r, solver="exact").dense(), f)
        V = got.right.double()
        assert torch.allclose(got.dense().double(), weight.double() @ V @ V.mT, atol=1e-4)  # W V_r V_r^T, dead rows too
    # The default (truncated) solver finds the same subspace.
    assert torch.allclose(fw(weight, 4, _fisher(f)).dense(), fw(weight, 4, _fisher(f), solver="exact").dense(), atol=1e-3)


def test_fwsvd_refuses_statistics_without_a_gradient(weight):
    fw = get_method("fwsvd")
    with pytest.raises(SpecError, match="needs the Fisher information of each output row"):
        fw(weight, 2, None)
    with pytest.raises(SpecError, match="needs the Fisher information"):
        fw(weight, 2, LayerStats(torch.eye(32, dtype=torch.float64), 10))  # activations only
    with pytest.raises(SpecError, match="zero, negative or non-finite"):
        fw(weight, 2, _fisher(torch.zeros(48)))
    with pytest.raises(SpecError, match=r"shape \(32,\), expected \(48,\)"):
        fw(weight, 2, _fisher(torch.ones(32)))


def test_fwsvd_spec(tmp_path):
    spec = DecompositionSpec.from_args({"method": "fwsvd", "rank": 4})
    assert spec.calib == "wikitext_local" and spec.method_options() == {}
    assert spec.grad_batch == 2 and DecompositionSpec.from_args({"method": "fwsvd", "grad_batch": "3"}).grad_batch == 3
    with pytest.raises(SpecError, match="grad_batch='0'.*expected an int >= 1"):
        DecompositionSpec.from_args({"method": "fwsvd", "grad_batch": "0"})
    assert spec.grad_checkpoint is None and spec.to_dict()["grad_checkpoint"] == "auto"  # auto: by the memory free
    for given, parsed in (("True", True), ("false", False), (" Auto", None), (False, False)):
        got = DecompositionSpec.from_args({"method": "fwsvd", "grad_checkpoint": given})
        assert got.grad_checkpoint is parsed and DecompositionSpec.from_args(got.to_dict()) == got
    with pytest.raises(SpecError, match="grad_checkpoint='yes please' is invalid: expected auto, true or false"):
        DecompositionSpec.from_args({"method": "fwsvd", "grad_checkpoint": "yes please"})
    assert "grad_checkpoint" not in FACTOR_FIELDS and "grad_batch" not in FACTOR_FIELDS  # the same sums: caches shared
    assert DecompositionSpec.from_args({"method": "fwsvd", "budget": 0.8, "allocator": "tail"}).allocator == "tail"
    with pytest.raises(SpecError, match="allocator='output_error' is invalid with method='fwsvd'.*valid: uniform, tail"):
        DecompositionSpec.from_args({"method": "fwsvd", "budget": 0.8, "allocator": "output_error"})


def _reference_fisher(model, path: str, ids: torch.Tensor) -> torch.Tensor:
    """From the layer's own input X and output gradient G of each sequence: dL/dW = G^T X."""
    linear = model.get_submodule(path)
    seen = {}

    def grab(_m, args, out):
        seen["x"] = args[0].detach()
        out.register_hook(lambda g: seen.__setitem__("g", g.detach()))

    handle = linear.register_forward_hook(grab)
    linear.weight.requires_grad_(True)
    total = torch.zeros(linear.out_features, dtype=torch.float64)
    try:
        for i in range(ids.shape[0]):
            model(input_ids=ids[i : i + 1], labels=ids[i : i + 1], use_cache=False).loss.backward()
            grad = seen["g"][0].double().mT @ seen["x"][0].double()  # out x in
            total += grad.square().sum(dim=1)
            model.zero_grad(set_to_none=True)
    finally:
        handle.remove()
    return total


def test_fisher_row_sums_are_each_sequences_squared_gradient(tiny_llama):
    from lm_eval_lowrank.calibration import fisher_row_sums

    ids = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(1))
    paths = ["model.layers.0.self_attn.k_proj", "model.layers.3.mlp.down_proj"]
    # What the caller had is put back: a gradient in progress, a frozen weight, training mode.
    mine = torch.full_like(tiny_llama.model.layers[3].mlp.down_proj.weight, 0.5)
    tiny_llama.model.layers[3].mlp.down_proj.weight.grad = mine
    tiny_llama.model.norm.weight.requires_grad_(False)
    tiny_llama.train()
    got, tokens = fisher_row_sums(tiny_llama, paths, ids)
    assert tokens == 36 and got["model.layers.0.self_attn.k_proj"].shape == (32,)  # k: 2 heads of 16
    assert tiny_llama.model.layers[3].mlp.down_proj.weight.grad is mine and tiny_llama.training
    assert not tiny_llama.model.norm.weight.requires_grad and tiny_llama.model.embed_tokens.weight.requires_grad
    assert sum(p.grad is not None for p in tiny_llama.parameters()) == 1
    tiny_llama.eval()
    for p in tiny_llama.parameters():
        p.requires_grad_(False)
    for path in paths:
        assert torch.allclose(got[path], _reference_fisher(tiny_llama, path, ids), rtol=1e-5)
    # The sum of per-sequence squares, not the square of the summed gradient.
    one_by_one = sum(fisher_row_sums(tiny_llama, paths[:1], ids[i : i + 1])[0][paths[0]] for i in range(3))
    assert torch.allclose(got[paths[0]], one_by_one, rtol=1e-6)


def test_gradient_row_sums_reader_both_ways_are_the_squared_gradients():
    """Through the inputs' T x T kernel (short sequences, shared by modules with the same input) or the explicit
    G^T X (long ones), the same sums."""
    from lm_eval_lowrank.calibration import _gradient_row_sums_reader

    gen = torch.Generator().manual_seed(3)
    for t, n_in, n_out, kernel_way in ((6, 16, 24, True), (40, 8, 6, False)):
        x, g = torch.randn(3, t, n_in, generator=gen), torch.randn(3, t, n_out, generator=gen)
        expected = sum((g[n].double().mT @ x[n].double()).square().sum(dim=1) for n in range(3))
        read, kernel = _gradient_row_sums_reader(x, n_out)
        assert (kernel is not None) == kernel_way
        got = read(g)
        assert got.dtype == torch.float64 and torch.allclose(got, expected, rtol=1e-5)
        if kernel_way:  # a second module on the same inputs reuses the kernel
            g2 = torch.randn(3, t, 12, generator=gen)
            read2, kernel2 = _gradient_row_sums_reader(x, 12, kernel)
            assert kernel2 is kernel and torch.allclose(read2(g2), sum((g2[n].double().mT @ x[n].double()).square().sum(dim=1) for n in range(3)), rtol=1e-5)


def test_batched_gradient_pass_equals_the_per_sequence_one(tiny_llama):
    """Batches of 2 over 5 sequences (a short last batch) give the per-sequence weight-gradient pass's sums; the
    backward stops at the first targeted layer."""
    from lm_eval_lowrank.calibration import fisher_row_sums

    ids = torch.randint(0, 128, (5, 10), generator=torch.Generator().manual_seed(4))
    paths = [f"model.layers.2.{t}" for t in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.up_proj")]
    paths.append("model.layers.3.mlp.down_proj")
    reached = []
    handle = tiny_llama.model.layers[1].register_full_backward_hook(lambda *_: reached.append(1))
    try:
        batched, tokens = fisher_row_sums(tiny_llama, paths, ids, batch_size=2)
    finally:
        handle.remove()
    per_sequence, _ = fisher_row_sums(tiny_llama, paths, ids, batch_size=1)
    assert tokens == 50 and not reached
    for p in paths:
        assert float(batched[p].min()) > 0 and torch.allclose(batched[p], per_sequence[p], rtol=1e-5)
    with pytest.raises(ValueError, match="batch_size=0 is invalid"):
        fisher_row_sums(tiny_llama, paths, ids, batch_size=0)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_gradient_pass_memory_savers_keep_the_sums(tiny_llama, monkeypatch, batch_size):
    """The head's gradient in chunks of positions (the logits never whole) gives autograd's sums to round-off, and
    checkpointed layers the same bits, with the layers behind the first target run twice and only their inputs
    held by the graph."""
    from lm_eval_lowrank import calibration

    ids = torch.randint(0, 128, (3, 11), generator=torch.Generator().manual_seed(5))
    paths = ["model.layers.1.self_attn.v_proj", "model.layers.1.mlp.gate_proj", "model.layers.3.self_attn.o_proj"]
    real_probe = calibration._head_returns_logits
    monkeypatch.setattr(calibration, "_head_returns_logits", lambda *a: False)
    autograd_head, _ = calibration.fisher_row_sums(tiny_llama, paths, ids, batch_size=batch_size)
    monkeypatch.setattr(calibration, "_head_returns_logits", real_probe)
    monkeypatch.setattr(calibration, "_HEAD_CHUNK_ELEMENTS", 128 * 7)  # 7 positions a chunk: chunks cross sequences

    widths: list[int] = []
    handle = tiny_llama.lm_head.register_forward_hook(lambda _m, _a, out: widths.append(out.shape[-1]))
    try:
        fused, _ = calibration.fisher_row_sums(tiny_llama, paths, ids, batch_size=batch_size)
    finally:
        handle.remove()
    assert widths[0] == 128 and set(widths[1:]) == {0}  # the probe's logits, then never the batch's
    for p in paths:
        assert float(fused[p].min()) > 0 and torch.allclose(fused[p], autograd_head[p], rtol=1e-5)

    def held_by_graph(checkpoint_layers: bool) -> tuple[dict[str, torch.Tensor], int, int]:
        """(sums, bytes the graph saved outside checkpointed layers, forwards of layer 3's MLP)"""
        params = {q.untyped_storage().data_ptr() for q in tiny_llama.parameters()}
        held, runs = [0], [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.untyped_storage().data_ptr() not in params:
                held[0] += t.untyped_storage().nbytes()
            return t

        # A pre-hook counts each run of the MLP: the forward, and the backward's recomputation when checkpointed.
        h = tiny_llama.model.layers[2].mlp.register_forward_pre_hook(lambda *_: runs.__setitem__(0, runs[0] + 1))
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                sums, _ = calibration.fisher_row_sums(tiny_llama, paths, ids, batch_size=batch_size, checkpoint_layers=checkpoint_layers)
        finally:
            h.remove()
        return sums, held[0], runs[0]

    plain, plain_held, plain_runs = held_by_graph(False)
    ckpt, ckpt_held, ckpt_runs = held_by_graph(True)
    assert all(torch.equal(ckpt[p], plain[p]) and torch.equal(plain[p], fused[p]) for p in paths)
    assert plain_runs == 1 + len(range(0, 3, batch_size)) and ckpt_runs == 1 + 2 * len(range(0, 3, batch_size))  # 1: the probe
    # Checkpointed, the graph keeps per token the inputs of layers 3 and 4 (layer 2's needs no gradient) and the
    # final norm's four vectors: 6 of width 64, against 8x as much without.
    assert ckpt_held < 7 * 33 * 64 * 4 and plain_held > 5 * ckpt_held


@pytest.mark.parametrize("batch_size", [1, 2])
def test_gradient_pass_checkpoints_by_itself_once_the_first_batch_passes_its_budget(tiny_llama, monkeypatch, batch_size):
    """grad_checkpoint=auto: the first batch runs plain while what it holds for the backward is counted. Past half
    the free memory its forward stops, the layers are checkpointed and the batch runs again: the same bits as a
    plain pass. Under the budget it stays plain and says how much it held."""
    from lm_eval_lowrank import calibration

    ids = torch.randint(0, 128, (3, 11), generator=torch.Generator().manual_seed(5))
    paths = ["model.layers.1.self_attn.v_proj", "model.layers.1.mlp.gate_proj", "model.layers.3.self_attn.o_proj"]
    plain, _ = calibration.fisher_row_sums(tiny_llama, paths, ids, batch_size=batch_size, checkpoint_layers=False)
    runs, counted, saved = [0], [], []
    hook = tiny_llama.model.layers[3].mlp.register_forward_pre_hook(lambda *_: runs.__setitem__(0, runs[0] + 1))
    real_hold, real_pack = calibration._HeldBytes.hold, calibration._HeldBytes.pack
    monkeypatch.setattr(calibration._HeldBytes, "hold", lambda self, t: (counted.append(tuple(t.shape)), real_hold(self, t))[1])
    own = {t.untyped_storage().data_ptr() for t in [*tiny_llama.parameters(), *tiny_llama.buffers()]}  # the model keeps those

    def pack(self, t):
        if t.untyped_storage().data_ptr() not in own:
            saved.append(weakref.ref(t))
        return real_pack(self, t)

    monkeypatch.setattr(calibration._HeldBytes, "pack", pack)

    def auto_pass(free: int | None) -> tuple[dict[str, torch.Tensor], dict[str, object], int]:
        monkeypatch.setattr(calibration, "free_memory_bytes", lambda device: free)
        runs[0], report = 0, {}
        sums, _ = calibration.fisher_row_sums(tiny_llama, paths, ids, batch_size=batch_size, report=report)
        return sums, report, runs[0]

    try:
        roomy, roomy_report, roomy_runs = auto_pass(1 << 40)
        kernels = counted.count((batch_size, 11, 11))
        unknown, unknown_report, _ = auto_pass(None)
        # half of what the first batch holds: its forward stops midway, in layer 3
        saved.clear()
        tight, tight_report, tight_runs = auto_pass(roomy_report["held_bytes_first_batch"])
        stopped_forward = [r for r in saved]
    finally:
        hook.remove()
    batches = len(range(0, 3, batch_size))
    held = roomy_report["held_bytes_first_batch"]
    assert roomy_report == {"checkpoint_layers": False, "held_bytes_first_batch": held, "held_budget_bytes": 1 << 39, "linears_in_fp32": False}
    assert roomy_runs == 1 + batches  # the probe, then one forward a batch
    # grad_batch=2 reads the targets' gradients through their inputs' T x T kernels, which are counted too
    assert kernels == (3 if batch_size == 2 else 0)
    # Held (fp32): the graph's saved tensors and the readers' kernels in layers 2-4, per token at least each
    # layer's three MLP vectors of width 160 and two norm inputs of 64, and under 16 vectors of 64 a layer.
    tokens = ids.shape[1] * batch_size
    assert 3 * (3 * 160 + 2 * 64) * 4 * tokens < held < 3 * 16 * 64 * 4 * tokens
    assert unknown_report == {"checkpoint_layers": False, "held_bytes_first_batch": held, "held_budget_bytes": None, "linears_in_fp32": False}
    assert tight_report["checkpoint_layers"] is True and tight_report["held_budget_bytes"] == held // 2
    assert held // 2 < tight_report["held_bytes_first_batch"] < held  # stopped where it passed the budget
    # Nothing of the stopped forward outlives it (no garbage collection needed): its graph was not leaked.
    assert stopped_forward and all(r() is None for r in stopped_forward)
    # The probe, then a forward and a recomputation a batch (the stopped forward ended before layer 4's MLP)
    assert tight_runs == 1 + 2 * batches
    assert all(torch.equal(s[p], plain[p]) for s in (roomy, unknown, tight) for p in paths)
    assert all("forward" not in layer.__dict__ for layer in tiny_llama.model.layers) and "forward" not in tiny_llama.lm_head.__dict__


@pytest.mark.parametrize("long_inputs", [False, True])
def test_checkpointed_readers_hold_one_layer_at_a_time(tiny_llama, monkeypatch, long_inputs):
    """Checkpointed, the gradient readers are made in the backward's recomputation of each layer, not in the first
    forward: what they keep (the inputs' T x T kernels, or the inputs themselves for long sequences) is one layer's
    at a time instead of every targeted layer's, each reader is made once, and the sums are the same bits."""
    from lm_eval_lowrank import calibration

    # 40 tokens: T (in + out) > in out for q, k, v and o, whose readers take the explicit products and keep the inputs
    ids = torch.randint(0, 128, (4, 40 if long_inputs else 11), generator=torch.Generator().manual_seed(3))
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    paths = [f"model.layers.{i}.{n}" for i in (1, 2, 3) for n in names]
    real = calibration._gradient_row_sums_reader
    kept: list[weakref.ref] = []
    live_peak, made = [0], [0]

    def count_live() -> None:
        live_peak[0] = max(live_peak[0], len({t.untyped_storage().data_ptr() for t in (r() for r in kept) if t is not None}))

    def reader(x, n_out, kernel=None):
        count_live()
        read, own = real(x, n_out, kernel)
        made[0] += 1
        # the explicit reader keeps (a view of) the input: the tensor in its closure
        held = own if own is not None else next(c.cell_contents for c in read.__closure__ if isinstance(c.cell_contents, torch.Tensor))
        kept.append(weakref.ref(held))

        def counted_read(g):
            count_live()
            return read(g)

        return counted_read, own

    monkeypatch.setattr(calibration, "_gradient_row_sums_reader", reader)

    def run(checkpoint_layers: bool) -> tuple[dict[str, torch.Tensor], int, int]:
        kept.clear()
        live_peak[0] = made[0] = 0
        sums, _ = calibration.fisher_row_sums(tiny_llama, paths, ids, batch_size=2, checkpoint_layers=checkpoint_layers)
        return sums, live_peak[0], made[0]

    plain, plain_live, plain_made = run(False)
    ckpt, ckpt_live, ckpt_made = run(True)
    assert all(torch.equal(ckpt[p], plain[p]) and float(plain[p].min()) > 0 for p in paths)
    assert plain_made == ckpt_made == len(paths) * 2  # each reader made once a batch, checkpointed or not
    # Four kept storages a layer (q, k and v share one input, gate and up another). Plain, all three layers'
    # are held before the backward starts; checkpointed, at most one layer's, and the last one the layer before
    # made (kept for sharing with the next module until that module's reader replaces it).
    assert plain_live == 3 * 4 and ckpt_live <= 4 + 1


def test_reads_across_recomputation_pair_a_gradient_with_its_reader_in_either_order():
    """A target's gradient meets the reader made in its layer's recomputation whichever comes first (a layer's last
    target sends its gradient before the recomputation); calls are told apart by their checkpoint call and their
    place among that name's calls; a reader that never gets a gradient adds nothing, a gradient that never gets a
    reader is an error."""
    from lm_eval_lowrank.calibration import _CheckpointSite, _ReadsAcrossRecomputation

    reads = _ReadsAcrossRecomputation()
    got: list[tuple[str, float]] = []
    first, second = object(), object()
    outs = {}
    for token in (first, second):
        for call in range(2):  # the same module twice in one checkpointed layer
            out = torch.zeros(2, requires_grad=True) * 1.0
            outs[token, call] = out
            reads.forward(_CheckpointSite(token, False), "m", out, lambda read, g, tag=f"{'ab'[token is second]}{call}": got.append((tag, read(g))))
    # the second layer's recomputation comes first; its first call's gradient arrives before it, the second's after
    outs[second, 0].backward(torch.full((2,), 1.0), retain_graph=True)
    for call in range(2):
        reads.recomputed(_CheckpointSite(second, True), "m", lambda g, k=call: float(g.sum()) + 10 * k)
    outs[second, 1].backward(torch.full((2,), 2.0))
    for call in range(2):
        reads.recomputed(_CheckpointSite(first, True), "m", lambda g, k=call: float(g.sum()) + 10 * k)
    outs[first, 1].backward(torch.full((2,), 3.0))
    assert got == [("b0", 2.0), ("b1", 14.0), ("a1", 16.0)]
    reads.finish()  # first's call 0 made a reader but had no gradient: nothing to add, no error

    lost = _ReadsAcrossRecomputation()
    out = torch.zeros(2, requires_grad=True) * 1.0
    lost.forward(_CheckpointSite(first, False), "model.layers.3.mlp.down_proj", out, lambda read, g: None)
    out.backward(torch.ones(2))
    with pytest.raises(RuntimeError, match="the checkpointed recomputation never reached model.layers.3.mlp.down_proj; grad_checkpoint=false"):
        lost.finish()


def test_held_budget_is_per_device_for_a_sharded_model(tiny_llama, monkeypatch):
    """grad_checkpoint=auto on a model sharded over several devices: each device's held bytes are counted against
    half of that device's own free memory (its layers' activations live there), not against the first device's; a
    device whose free memory is unknown bounds nothing. The JSON's fields then say what each device held."""
    from lm_eval_lowrank import calibration

    assert calibration._model_devices(tiny_llama) == [torch.device("cpu")]
    offloaded = torch.nn.Linear(2, 2)
    offloaded.register_buffer("on_disk", torch.empty(3, device="meta"))  # accelerate's offloaded weights sit on meta
    assert calibration._model_devices(offloaded) == [torch.device("cpu")]
    devices = [torch.device("cpu"), torch.device("cuda", 0), torch.device("cuda", 1)]
    free = {"cpu": None, "cuda:0": 1000, "cuda:1": 4001}
    asked: list[str] = []
    monkeypatch.setattr(calibration, "_model_devices", lambda model: devices)
    monkeypatch.setattr(calibration, "free_memory_bytes", lambda device: (asked.append(str(device)), free[str(device)])[1])
    budgets = calibration._held_budgets(tiny_llama)
    assert asked == ["cpu", "cuda:0", "cuda:1"] and budgets == {"cpu": None, "cuda:0": 500, "cuda:1": 2000}

    # Only the charged device's budget counts: 3 x 400 bytes on the CPU stay within a CPU budget of 1000 only
    # twice, however small or large the other devices' budgets are.
    for others in (10, 10**9):
        meter = calibration._HeldBytes(tiny_llama, {"cuda:0": others, "cpu": 1000})
        meter.hold(torch.zeros(100))
        meter.hold(torch.zeros(100))
        meter.hold(tiny_llama.model.embed_tokens.weight)  # the model's own: not counted
        with pytest.raises(calibration._OverHeldBudget):
            meter.hold(torch.zeros(100))
        assert meter.by_device == {"cpu": 1200} and meter.bytes == 1200
    unbounded = calibration._HeldBytes(tiny_llama, {"cpu": None})
    unbounded.hold(torch.zeros(10**6))
    assert unbounded.bytes == 4 * 10**6

    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(5))
    report: dict[str, object] = {}
    calibration.fisher_row_sums(tiny_llama, ["model.layers.2.mlp.up_proj"], ids, batch_size=2, report=report)
    held = report["held_bytes_first_batch"]
    assert 0 < held and report["checkpoint_layers"] is False and report["held_budget_bytes"] == 2500  # the known ones
    assert report["held_by_device"] == {"cpu": {"held_bytes": held, "budget_bytes": None}, "cuda:0": {"held_bytes": 0, "budget_bytes": 500}, "cuda:1": {"held_bytes": 0, "budget_bytes": 2000}}
    one: dict[str, object] = {}
    monkeypatch.setattr(calibration, "_model_devices", lambda model: devices[:1])
    monkeypatch.setattr(calibration, "free_memory_bytes", lambda device: 1 << 40)
    calibration.fisher_row_sums(tiny_llama, ["model.layers.2.mlp.up_proj"], ids, batch_size=2, report=one)
    assert "held_by_device" not in one and one["held_budget_bytes"] == 1 << 39  # one device: the fields as before


def test_free_memory_is_bounded_by_the_memory_cgroups(tmp_path, monkeypatch):
    """The CPU's free memory is MemAvailable, or less where this process's memory cgroups allow less: the least
    headroom (limit less use, reclaimable page cache not counted as used) over its own cgroup and every parent
    with a limit, v2 or v1; cgroups without a limit bound nothing."""
    from lm_eval_lowrank import measure

    def write(folder, **files):
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (folder / name.replace("_", ".", 1) if name.startswith("memory_") else folder / name).write_text(text + "\n")

    def headroom(root, proc_line: str):
        (tmp_path / "cgroup").write_text(proc_line + "\n")
        return measure._cgroup_headroom(str(root), str(tmp_path / "cgroup"))

    v2 = tmp_path / "v2"  # a batch job's step inside its job: the job's limit binds
    write(v2, memory_max="max", memory_current="9000")
    write(v2 / "job", memory_max="1000", memory_current="600", memory_stat="anon 500\ninactive_file 150\nactive_file 50")
    write(v2 / "job" / "step", memory_max="max", memory_current="600")
    assert headroom(v2, "0::/job/step") == 1000 - 600 + 150
    write(v2 / "job" / "step", memory_max="500", memory_current="450")  # now the step's own is tighter
    assert headroom(v2, "0::/job/step") == 50
    write(v2 / "job" / "step", memory_max="5000", memory_current="600")  # a limit of its own, the job's tighter
    assert headroom(v2, "0::/job/step") == 1000 - 600 + 150
    write(v2 / "job" / "step", memory_current="6000")
    assert headroom(v2, "0::/job/step") == 0  # over its limit: nothing left
    assert headroom(v2, "0::/") is None  # a namespaced container sees its own cgroup at the root: unlimited here

    v1 = tmp_path / "v1"
    unlimited = "9223372036854771712"  # v1's "no limit"
    write(v1 / "memory", memory_limit_in_bytes=unlimited, memory_usage_in_bytes="600")
    write(v1 / "memory" / "a", memory_limit_in_bytes=unlimited, memory_usage_in_bytes="600")
    assert headroom(v1, "5:cpu,cpuacct:/a\n4:memory:/a\n0::/") is None
    write(v1 / "memory" / "a", memory_limit_in_bytes="2000", memory_stat="inactive_file 7\ntotal_inactive_file 100")
    assert headroom(v1, "5:cpu,cpuacct:/elsewhere\n4:memory:/a\n0::/") == 2000 - 600 + 100

    cpu = torch.device("cpu")
    mem_total = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal:"))
    monkeypatch.setattr(measure, "_cgroup_headroom", lambda *a: None)
    free = measure.free_memory_bytes(cpu)
    assert 0 < free <= mem_total
    monkeypatch.setattr(measure, "_cgroup_headroom", lambda *a: 12345)
    assert measure.free_memory_bytes(cpu) == 12345
    assert measure.free_memory_bytes(torch.device("meta")) is None


def test_gradient_pass_keeps_a_models_logit_transform(monkeypatch):
    """A head whose logits the model transforms (Gemma 2's soft-capping) is not replaced: the sums are those of the
    model's own loss."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from lm_eval_lowrank import calibration

    torch.manual_seed(0)
    cfg = Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                       head_dim=16, vocab_size=96, final_logit_softcapping=0.5)  # fmt: skip
    m = Gemma2ForCausalLM(cfg).eval()
    assert not calibration._head_returns_logits(m, m.lm_head, torch.device("cpu"))
    ids = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(6))
    path = "model.layers.1.mlp.down_proj"
    got, _ = calibration.fisher_row_sums(m, [path], ids, batch_size=2, checkpoint_layers=True)
    for p in m.parameters():
        p.requires_grad_(False)
    assert torch.allclose(got[path], _reference_fisher(m, path, ids), rtol=1e-5)


_FREED_HEAP = r"""
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from lm_eval_lowrank import calibration

def rss_mib():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS")) // 1024

torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=128)).eval()
big = torch.ones(4 << 20)  # 16 MiB, mapped on its own; freeing it raises glibc's mmap threshold to 16 MiB
del big
blocks = [torch.ones(1 << 20) for _ in range(64)]  # 256 MiB in 4 MiB blocks, now taken from the heap
pin = torch.ones(1 << 20)  # above them: free() alone cannot shrink the heap
del blocks
before = rss_mib()
if sys.argv[1] == "pass":
    calibration.fisher_row_sums(model, ["model.layers.1.mlp.down_proj"], torch.randint(0, 128, (2, 8)))
else:
    assert calibration.return_freed_heap()
print(before - rss_mib())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc's malloc_trim")
@pytest.mark.parametrize("how", ["direct", "pass"])
def test_freed_heap_goes_back_to_the_os_after_the_gradient_pass(how):
    """glibc keeps freed heap blocks mapped, so a pass's peak would stay in RSS under whatever runs next; the pass
    ends by handing them back. Here 256 MiB freed before the pass: gone after it (a fresh process each)."""
    r = subprocess.run([sys.executable, "-c", _FREED_HEAP, how], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout.split()[-1]) > 200


def test_fisher_row_sums_of_a_conv1d_are_per_output():
    """GPT-2 stores c_attn as in x out; its rows are the columns of the stored weight."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from lm_eval_lowrank.calibration import fisher_row_sums

    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=32)).eval()
    ids = torch.randint(0, 50, (2, 10), generator=torch.Generator().manual_seed(2))
    got, _ = fisher_row_sums(m, ["transformer.h.1.attn.c_attn"], ids)
    weight = m.transformer.h[1].attn.c_attn.weight  # 32 x 96
    weight.requires_grad_(True)
    expected = torch.zeros(96, dtype=torch.float64)
    for i in range(2):
        m(input_ids=ids[i : i + 1], labels=ids[i : i + 1]).loss.backward()
        expected += weight.grad.double().square().sum(dim=0)
        weight.grad = None
    assert got["transformer.h.1.attn.c_attn"].shape == (96,) and torch.allclose(got["transformer.h.1.attn.c_attn"], expected, rtol=1e-6)


def test_fwsvd_through_compress_model_on_calibration_data(tiny_llama_dir, benchmark_data, monkeypatch):
    """The whole path: calibration tokens from the shared data, one gradient pass in batches of grad_batch, factors
    in place, and the report says what the statistics were."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lm_eval_lowrank import calibration
    from lm_eval_lowrank.api import compress_model
    from lm_eval_lowrank.modules import LowRankLinear

    real, batches = calibration.fisher_row_sums, []

    def spy(*args, batch_size=2, checkpoint_layers=False, **kwargs):
        batches.append((batch_size, checkpoint_layers))
        return real(*args, batch_size=batch_size, checkpoint_layers=checkpoint_layers, **kwargs)

    monkeypatch.setattr(calibration, "fisher_row_sums", spy)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    args = {"method": "fwsvd", "rank": 4, "layers": "2|3", "tensors": "q|down", "calib_n": 4, "calib_len": 32, "grad_batch": 3, "grad_checkpoint": "true", "cache": False}
    report = compress_model(model, args, tokenizer=tok, progress=False)
    assert batches == [(3, True)] and report.calibration["batch"] == 3 and report.calibration["checkpoint_layers"] is True
    assert report.calibration["grad_checkpoint"] is True and report.calibration["held_bytes_first_batch"] is None  # not counted when asked for
    assert isinstance(model.model.layers[1].self_attn.q_proj, LowRankLinear) and isinstance(model.model.layers[2].mlp.down_proj, LowRankLinear)
    assert report.solvers and all(name.startswith("fwsvd-") for name in report.solvers)
    assert report.calibration["statistics"].startswith("Fisher row sums") and report.calibration["seconds"] > 0
    assert all(p.grad is None for p in model.parameters()) and model.model.embed_tokens.weight.requires_grad  # the pass left no trace
    with torch.no_grad():
        assert math.isfinite(float(model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss))


def test_fwsvd_under_a_budget_gets_the_statistics_of_every_candidate(tiny_llama):
    """A budget's ranks are chosen after the provider is made: the gradient pass must cover every module the
    layers and tensors select (it once covered none, and the backward found nothing to differentiate)."""
    from lm_eval_lowrank.architectures import adapter_for_model
    from lm_eval_lowrank.calibration import FisherStatsProvider
    from lm_eval_lowrank.decompose import decompose_model

    spec = DecompositionSpec.from_args({"method": "fwsvd", "budget": 0.8, "layers": "2-3", "tensors": "q|up"})
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    provider = FisherStatsProvider(tiny_llama, adapter_for_model(tiny_llama), ids, spec)
    from lm_eval_lowrank.allocation import allocate_ranks

    ranks = allocate_ranks(spec, tiny_llama, stats_provider=provider)
    report = decompose_model(tiny_llama, spec, ranks=ranks, stats_provider=provider, progress=False)
    assert len(report.plan.targets) == 4 and all(name.startswith("fwsvd-") for name in report.solvers)


def test_fisher_cache_computes_each_module_once_across_configurations(tiny_llama, tmp_path, monkeypatch):
    """A module's row sums depend on the dense weights and the data only: a later configuration takes the modules
    it shares with an earlier one from the cache and computes the rest, with the same values as a pass without
    the cache. Other data, or a torn file, computes again."""
    from types import SimpleNamespace

    from lm_eval_lowrank import calibration
    from lm_eval_lowrank.architectures import adapter_for_model
    from lm_eval_lowrank.calibration import FisherStatsProvider

    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    adapter = adapter_for_model(tiny_llama)

    def stats(layers: str, cache: bool = True, seed: int = 0) -> tuple[FisherStatsProvider, dict[str, torch.Tensor]]:
        spec = DecompositionSpec.from_args({"method": "fwsvd", "rank": 2, "layers": layers, "tensors": "q|down"})
        record = {"source": "wikitext_local", "n": 2, "len": 12, "seed": seed}
        provider = FisherStatsProvider(tiny_llama, adapter, ids, spec, record=record, cache_dir=tmp_path if cache else None, model_key="m")
        paths = [f"model.layers.{i - 1}.{t}" for i in map(int, layers.split("|")) for t in ("self_attn.q_proj", "mlp.down_proj")]
        got = provider.layer_stats(tiny_llama, 0, [SimpleNamespace(path=p) for p in paths])
        return provider, {p: s.output_fisher for p, s in got.items()}

    first, _ = stats("2|3")
    assert (first.hits, first.misses) == (0, 4) and len(list(tmp_path.glob("m/fisher-*.pt"))) == 1
    second, cached = stats("3|4")
    assert (second.hits, second.misses) == (2, 2)
    _, fresh = stats("3|4", cache=False)
    assert cached.keys() == fresh.keys() and all(torch.allclose(cached[p], fresh[p], rtol=1e-9, atol=0) for p in fresh)
    assert second.describe()["cache"] == {"dir": str(tmp_path), "hits": 2, "misses": 2}

    def no_pass(*_a, **_k):
        raise AssertionError("every module is cached: no gradient pass")

    with monkeypatch.context() as m:
        m.setattr(calibration, "fisher_row_sums", no_pass)
        third, _ = stats("2|3|4")
        assert (third.hits, third.misses) == (6, 0)
    assert stats("2", seed=1)[0].misses == 2  # other calibration data
    next(tmp_path.glob("m/fisher-*.pt")).write_bytes(b"torn")
    assert stats("2")[0].misses == 2
