"""The replacement module and in-place decomposition on tiny random-weight models."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from conftest import tiny_llama_config
from lm_eval_lowrank.architectures import GenericAdapter, adapter_for_model
from lm_eval_lowrank.decompose import count_parameters, decompose_model
from lm_eval_lowrank.methods.tucker import tucker2
from lm_eval_lowrank.modules import LowRankLinear
from lm_eval_lowrank.plan import make_plan
from lm_eval_lowrank.spec import DecompositionSpec, SpecError


@pytest.mark.parametrize("layout", ["folded", "tucker"])
@pytest.mark.parametrize("bias", [True, False])
def test_full_rank_module_reproduces_the_dense_layer(layout, bias):
    torch.manual_seed(0)
    lin = nn.Linear(48, 32, bias=bias)
    f = tucker2(lin.weight.detach(), 32, solver="exact")
    mod = LowRankLinear.from_factors(f, lin.bias.detach() if bias else None, layout=layout)
    x = torch.randn(5, 7, 48)
    assert torch.allclose(mod(x), lin(x), atol=1e-5, rtol=1e-5)
    assert torch.allclose(mod.dense_weight(), lin.weight, atol=1e-5)


def test_module_layouts_hold_u1_core_u2_and_count_parameters():
    W = torch.randn(30, 20)
    f = tucker2(W, 4, solver="exact")
    three = LowRankLinear.from_factors(f, None, layout="tucker")
    two = LowRankLinear.from_factors(f, None, layout="folded")
    assert three.first.shape == (4, 20) and three.core.shape == (4, 4) and three.last.shape == (30, 4)
    assert two.core is None
    assert three.num_parameters() == 4 * (30 + 20) + 16
    assert two.num_parameters() == 4 * (30 + 20)
    x = torch.randn(3, 20)
    assert torch.allclose(three(x), two(x), atol=1e-5)


@pytest.mark.parametrize("layout", ["folded", "tucker"])
def test_parameter_count_after_equals_the_count_from_layer_shapes(tiny_llama, layout):
    cfg = tiny_llama.config
    before = count_parameters(tiny_llama)
    spec = DecompositionSpec.from_args({"rank": 3, "layers": "2|4", "tensors": "q|o|gate|down", "layout": layout})
    report = decompose_model(tiny_llama, spec, progress=False)
    h, i, r = cfg.hidden_size, cfg.intermediate_size, 3
    extra = r * r if layout == "tucker" else 0
    shapes = [(h, h), (h, h), (i, h), (h, i)]  # q, o, gate, down (out, in)
    removed_per_layer = sum(o * n - (r * (o + n) + extra) for o, n in shapes)
    assert report.params_before == before
    assert report.params_after == before - 2 * removed_per_layer
    assert report.params_after == count_parameters(tiny_llama)
    assert report.plan.params_removed == 2 * removed_per_layer
    assert report.to_dict()["modules"] == [
        f"model.layers.{L}.{p}" for L in (1, 3) for p in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")
    ]


def test_layers_are_one_based(tiny_llama):
    decompose_model(tiny_llama, DecompositionSpec.from_args({"rank": 2, "layers": 1, "tensors": "q"}), progress=False)
    assert isinstance(tiny_llama.model.layers[0].self_attn.q_proj, LowRankLinear)
    assert isinstance(tiny_llama.model.layers[1].self_attn.q_proj, nn.Linear)


def test_report_carries_the_certified_singular_value_error(tiny_llama):
    # Krylov certifies each module's top-r values; the JSON holds the worst bound and how many modules have one.
    report = decompose_model(tiny_llama, DecompositionSpec.from_args({"rank": 1, "layers": "1|2", "solver": "krylov"}), progress=False)
    d = report.to_dict()
    assert d["solvers"] == {"krylov": 14} and d["sv_error_bound_modules"] == 14
    assert 0 <= d["sv_error_bound"] <= 0.01
    tight = decompose_model(tiny_llama, DecompositionSpec.from_args({"rank": 1, "layers": "4", "solver": "krylov", "solver_tol": 1e-4}), progress=False)
    assert tight.sv_error_bound_modules == 7 and tight.sv_error_bound <= 1e-4
    exact = decompose_model(tiny_llama, DecompositionSpec.from_args({"rank": 1, "layers": "3", "solver": "exact"}), progress=False).to_dict()
    assert exact["sv_error_bound"] is None and exact["sv_error_bound_modules"] == 0


def test_replacement_is_in_place_and_drops_the_dense_weight(tiny_llama):
    old = tiny_llama.model.layers[2].mlp.up_proj
    import weakref

    wr = weakref.ref(old.weight)
    del old
    decompose_model(tiny_llama, DecompositionSpec.from_args({"rank": 2, "layers": 3, "tensors": "up"}), progress=False)
    assert wr() is None, "the dense weight is still referenced after decomposition"


def test_decomposition_is_deterministic():
    cfg = tiny_llama_config()
    from transformers import LlamaForCausalLM

    states = []
    for _ in range(2):
        torch.manual_seed(0)
        m = LlamaForCausalLM(cfg).eval()
        decompose_model(m, DecompositionSpec.from_args({"rank": 4, "layers": "all"}), progress=False)
        states.append(m.state_dict())
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k


def test_dtype_and_device_follow_the_model():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    m = LlamaForCausalLM(tiny_llama_config()).to(torch.bfloat16).eval()
    decompose_model(m, DecompositionSpec.from_args({"rank": 4, "layers": 2}), progress=False)
    mod = m.model.layers[1].mlp.down_proj
    assert isinstance(mod, LowRankLinear) and mod.first.dtype == torch.bfloat16 and mod.last.dtype == torch.bfloat16


def test_full_rank_model_matches_dense_logits():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    m = LlamaForCausalLM(tiny_llama_config()).eval()
    x = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        ref = m(x).logits
    # rank = min(out, in) saves nothing, so decompose modules directly at full rank
    adapter = adapter_for_model(m)
    for L in range(4):
        for t in adapter.tensor_names():
            path = adapter.module_path(L, t)
            lin = m.get_submodule(path)
            f = tucker2(lin.weight.detach(), min(lin.weight.shape), solver="exact")
            parent, _, leaf = path.rpartition(".")
            setattr(m.get_submodule(parent), leaf, LowRankLinear.from_factors(f, None, layout="tucker"))
    with torch.no_grad():
        out = m(x).logits
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)


def test_rank_that_saves_nothing_keeps_the_dense_layer(tiny_llama):
    with pytest.warns(UserWarning, match="kept dense"):
        report = decompose_model(tiny_llama, DecompositionSpec.from_args({"rank": 40, "layers": 1, "tensors": "q|gate"}), progress=False)
    # q is 64x64 (break-even 32) -> kept dense; gate 160x64 (break-even 46) -> decomposed
    assert [t.tensor for t in report.plan.targets] == ["gate"]
    assert report.plan.skipped[0]["path"] == "model.layers.0.self_attn.q_proj"
    assert isinstance(tiny_llama.model.layers[0].self_attn.q_proj, nn.Linear)


def test_gpt2_fused_conv1d():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=100, n_positions=64)).eval()
    x = torch.randint(0, 100, (1, 10))
    spec = DecompositionSpec.from_args({"rank": 8, "layers": "1|3"})
    report = decompose_model(m, spec, progress=False)
    assert {t.tensor for t in report.plan.targets} == {"qkv", "o", "up", "down"}
    attn = m.transformer.h[0].attn.c_attn
    assert isinstance(attn, LowRankLinear) and (attn.out_features, attn.in_features) == (192, 64)
    assert report.params_after == count_parameters(m)
    assert torch.isfinite(m(x).logits).all()
    with pytest.raises(SpecError, match=r"unknown tensor 'q'.*valid: qkv\|o\|up\|down"):
        make_plan(DecompositionSpec.from_args({"rank": 2, "tensors": "q"}), m.config)


def test_gpt2_conv1d_at_full_rank_matches():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    m = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=16)).eval()
    conv = m.transformer.h[0].mlp.c_fc
    x = torch.randn(2, 5, 32)
    f = tucker2(conv.weight.detach().T, 32, solver="exact")
    mod = LowRankLinear.from_factors(f, conv.bias.detach(), layout="tucker")
    assert torch.allclose(mod(x), conv(x), atol=1e-5)


class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.wq = nn.Linear(d, d)
        self.ffn_in = nn.Linear(d, 2 * d)
        self.ffn_out = nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.ffn_out(torch.relu(self.ffn_in(self.wq(x))))


class _Toy(nn.Module):
    def __init__(self, d=16, n=3):
        super().__init__()
        self.config = type("Cfg", (), {"model_type": "toy-unknown"})()
        self.blocks = nn.ModuleList(_Block(d) for _ in range(n))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def test_generic_adapter_for_an_unknown_architecture():
    torch.manual_seed(0)
    m = _Toy()
    adapter = adapter_for_model(m)
    assert isinstance(adapter, GenericAdapter)
    assert adapter.tensor_names() == ("wq", "ffn_in", "ffn_out")
    report = decompose_model(m, DecompositionSpec.from_args({"rank": 2, "layers": "2|3", "tensors": "ffn_in"}), progress=False)
    assert report.plan.module_names() == ["blocks.1.ffn_in", "blocks.2.ffn_in"]
    assert isinstance(m.blocks[1].ffn_in, LowRankLinear)
    assert torch.isfinite(m(torch.randn(2, 16))).all()
    with pytest.raises(SpecError, match=r"unknown tensor 'q'.*valid: wq\|ffn_in\|ffn_out"):
        decompose_model(_Toy(), DecompositionSpec.from_args({"rank": 2, "tensors": "q"}), progress=False)


def test_file_mapped_weights_release_pages_without_corrupting_the_model(tmp_path):
    """Decomposing a model loaded from safetensors (mmap) gives the same model as in memory."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    mem = LlamaForCausalLM(tiny_llama_config(hidden_size=256, intermediate_size=1024)).eval()
    mem.save_pretrained(tmp_path)
    mapped = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    spec = DecompositionSpec.from_args({"rank": 8, "layers": "1|3", "tensors": "q|gate|down", "cache": False})
    decompose_model(mem, spec, progress=False)
    decompose_model(mapped, spec, progress=False)
    x = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        assert torch.equal(mem(x).logits, mapped(x).logits)


@pytest.mark.parametrize("arch", ["gemma", "qwen2", "mistral", "qwen3"])
def test_llama_family_architectures(arch):
    import transformers

    cfg_cls, model_cls = {
        "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[arch]
    cfg = cfg_cls(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=100, max_position_embeddings=64)
    torch.manual_seed(0)
    m = model_cls(cfg).eval()
    from lm_eval_lowrank.architectures import adapter_for_config

    adapter = adapter_for_config(cfg)
    assert adapter is not None and adapter.param_count(cfg) == count_parameters(m)  # config-side count is exact
    report = decompose_model(m, DecompositionSpec.from_args({"rank": 4, "layers": "2|3"}), progress=False)
    assert len(report.plan.targets) == 14 and report.params_after == count_parameters(m)
    if arch == "qwen2":  # q/k/v carry biases, kept dense next to the factors
        assert m.model.layers[1].self_attn.q_proj.bias is not None
    with torch.no_grad():
        assert torch.isfinite(m(torch.randint(0, 100, (1, 6))).logits).all()


def test_page_release_waits_for_every_module_that_holds_a_storage():
    # The releaser counts module slots per storage once, then updates the counts on each replacement:
    # a weight tied into a second module must stay mapped until that module is replaced too.
    from lm_eval_lowrank.decompose import _PageReleaser

    advised: list[int] = []

    class FakeLibc:
        def madvise(self, lo: int, length: int, advice: int) -> int:
            advised.append(length)
            return 0

    pages = _PageReleaser()
    pages.libc, pages.ranges = FakeLibc(), [(0, 2**64)]  # every storage counts as file-backed here
    a, b, c = nn.Linear(512, 512), nn.Linear(512, 512), nn.Linear(512, 512)
    b.weight = a.weight  # tied
    model = nn.Sequential(a, b, c)
    pages.watch(model)
    model[0] = nn.Identity()
    pages.retire(a)
    assert advised == []  # b still holds the weight
    model[1] = nn.Identity()
    pages.retire(b)
    assert len(advised) == 1 and advised[0] > 512 * 512 * 4 - 2 * 4096 - 1  # the whole pages inside the weight
    model[2] = nn.Identity()
    pages.retire(c)
    assert len(advised) == 2 and pages.released == sum(advised)


@pytest.mark.parametrize("rank,solver", [(2, "krylov"), (24, "gram")])
def test_parallel_solves_equal_a_one_thread_run_and_restore_the_thread_count(solve_pools, monkeypatch, rank, solver):
    import threading

    from transformers import LlamaForCausalLM

    from lm_eval_lowrank.methods import tucker as tk

    if solver == "gram" and not tk.gram_solves_release_gil():
        pytest.skip("the Gram solver holds the GIL here (no scipy): it is not pooled")
    gram_threads = []
    gram_svd = tk._gram_svd
    monkeypatch.setattr(tk, "_gram_svd", lambda A, r: gram_threads.append(threading.current_thread()) or gram_svd(A, r))
    cfg = tiny_llama_config(hidden_size=128, intermediate_size=320)
    spec = DecompositionSpec.from_args({"rank": rank, "layers": "all", "cache": False})
    before = torch.get_num_threads()
    states, reports = {}, {}
    try:
        for threads in (1, 2):
            gram_threads.clear()
            torch.set_num_threads(threads)
            torch.manual_seed(0)
            m = LlamaForCausalLM(cfg).eval()
            report = reports[threads] = decompose_model(m, spec, progress=False)
            assert torch.get_num_threads() == threads
            states[threads] = m.state_dict()
    finally:
        torch.set_num_threads(before)
    # the JSON says how the solves ran: every one in the pool of 2, none at one thread
    assert reports[2].to_dict()["solve_threads"] == {"torch_threads": 2, "pooled_solves": len(report.plan.targets), "pool_workers": 2}
    assert reports[1].to_dict()["solve_threads"] == {"torch_threads": 1, "pooled_solves": 0, "pool_workers": 0}
    assert report.solvers == {solver: sum(report.solvers.values())}
    assert solve_pools == [2]  # the 2-thread run: one pool of 2 for the whole (data-free) model
    if solver == "gram":  # the GIL-free Gram solves ran in the pool's threads, not the caller's
        assert gram_threads and threading.main_thread() not in gram_threads
    for k in states[1]:
        assert torch.equal(states[1][k], states[2][k]), k


def test_an_exception_in_the_replacement_loop_ends_the_solver_pool_settings_at_once():
    """A Ctrl-C (or a failing callback) while modules are replaced: the pool's one-thread torch and OpenBLAS settings
    end with it, not when the traceback that holds the solve generator is dropped (a notebook keeps it)."""
    from transformers import LlamaForCausalLM

    from lm_eval_lowrank.methods import tucker as tk

    before = torch.get_num_threads()
    calls = []

    def interrupt(t, new):
        calls.append(t.path)
        if len(calls) == 3:
            raise KeyboardInterrupt

    try:
        torch.set_num_threads(2)
        torch.manual_seed(0)
        model = LlamaForCausalLM(tiny_llama_config(hidden_size=64, intermediate_size=160)).eval()
        with pytest.raises(KeyboardInterrupt) as kept:  # kept.value.__traceback__ holds the frames, as a shell would
            decompose_model(model, DecompositionSpec.from_args({"rank": 2, "solver": "krylov", "cache": False}), progress=False, on_module=interrupt)
        assert kept.value.__traceback__ is not None
        assert (torch.get_num_threads(), tk._blas_pinned) == (2, 0)
    finally:
        torch.set_num_threads(before)


def test_parallel_solves_stay_within_the_copy_budget():
    import lm_eval_lowrank.decompose as dec
    from lm_eval_lowrank.plan import Target

    spec = DecompositionSpec.from_args({"rank": 2, "layers": "all", "cache": False})
    W = torch.randn(128, 128, dtype=torch.bfloat16)

    def jobs():
        return [(Target(path=f"m{i}", layer=1, tensor="q", rank=2, in_features=128, out_features=128), W) for i in range(4)]

    calls = []

    def solve(t, w):
        calls.append(t.path)
        return dec.get_method("tucker")(w.float(), t.rank)

    before = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        # One fp32 copy (64 KiB) fits the budget: no parallel copies, the caller solves them one at a time.
        assert list(dec._solve_in_parallel(jobs(), solve, spec, True, copy_budget=100_000)) == [None] * 4 and not calls
        out = list(dec._solve_in_parallel(jobs(), solve, spec, True, copy_budget=4 * 65536))
        assert all(f is not None for f in out) and sorted(calls) == ["m0", "m1", "m2", "m3"]
        assert list(dec._solve_in_parallel(jobs(), solve, spec, False, copy_budget=1e12)) == [None] * 4  # not data-free: serial

        def failing(t, w):
            if t.path == "m1":
                raise RuntimeError("solver failed")
            return solve(t, w)

        with pytest.raises(RuntimeError, match="solver failed"):
            list(dec._solve_in_parallel(jobs(), failing, spec, True, copy_budget=1e12))
        assert torch.get_num_threads() == 4  # restored after the error
    finally:
        torch.set_num_threads(before)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # peft reading a renamed transformers attribute
def test_under_a_peft_adapter_the_base_layer_is_decomposed_and_the_adapter_kept():
    """hf-tucker with peft=ADAPTER decomposes the model HFLM wrapped: each adapted linear's base layer becomes the
    factors, and the adapter still adds its own term, exactly as on the plain decomposed model."""
    import copy

    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from lm_eval_lowrank.api import compress_model

    torch.manual_seed(0)
    base = LlamaForCausalLM(tiny_llama_config()).eval()
    spec = {"rank": 2, "layers": "2", "tensors": "q|v"}
    plain = copy.deepcopy(base)
    compress_model(plain, spec, progress=False)
    adapted = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).eval()
    compress_model(adapted.get_base_model(), spec, progress=False)
    h = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for name in ("q_proj", "v_proj"):
            wrapped = getattr(adapted.get_base_model().model.layers[1].self_attn, name)
            assert isinstance(wrapped.base_layer, LowRankLinear)
            lora = wrapped.lora_B["default"](wrapped.lora_A["default"](h)) * wrapped.scaling["default"]
            expected = getattr(plain.model.layers[1].self_attn, name)(h) + lora
            torch.testing.assert_close(wrapped(h), expected, rtol=1e-6, atol=1e-6)
