"""hf-tucker inside lm-eval: registration, model_args, errors before load, the results JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import run_side_by_side, save_tiny_llama, write_arc_task

BIN = Path(sys.executable).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _run(args, cwd, timeout=600):
    return subprocess.run(args, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def test_both_hf_and_hf_tucker_resolve_in_a_fresh_process(tmp_path):
    code = (
        "import sys\n"
        "assert 'torch' not in sys.modules, 'startup hook imported torch'\n"
        "from lm_eval.api.registry import get_model\n"
        "from lm_eval.models.huggingface import HFLM\n"
        "assert get_model('hf') is HFLM\n"
        "cls = get_model('hf-tucker')\n"
        "assert issubclass(cls, HFLM) and cls.__name__ == 'HFTuckerLM'\n"
        "print('ok')\n"
    )
    r = _run([sys.executable, "-c", code], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_hf_tucker_first_then_hf_in_a_fresh_process(tmp_path):
    code = "from lm_eval.api.registry import get_model\nget_model('hf-tucker')\nprint(get_model('hf').__name__)"
    r = _run([sys.executable, "-c", code], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "HFLM"


def test_startup_hook_costs_no_torch_import(tmp_path):
    r = _run([sys.executable, "-c", "import sys; print('lm_eval_lowrank._autoload' in sys.modules, 'torch' in sys.modules, 'lm_eval' in sys.modules)"], cwd=tmp_path)
    assert r.stdout.split() == ["True", "False", "False"]


def test_entry_point_is_declared():
    from importlib.metadata import entry_points

    eps = {e.name: e.value for e in entry_points(group="lm_eval.models")}
    assert eps.get("hf-tucker") == "lm_eval_lowrank.harness:HFTuckerLM"


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, smollm2_dir):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), smollm2_dir, num_hidden_layers=6, max_position_embeddings=512)


@pytest.fixture(scope="module")
def arc_task_dir(tmp_path_factory):
    return write_arc_task(tmp_path_factory.mktemp("tasks"), "arc_tiny")


def _results(out_dir: Path) -> dict:
    files = sorted(out_dir.rglob("results_*.json"))
    assert files, f"no results JSON under {out_dir}"
    return json.loads(files[-1].read_text())


def test_cli_launchers_run_hf_tucker(tiny_model_dir, arc_task_dir, tmp_path):
    """``lm_eval``, ``python -m lm_eval`` and ``lm-eval run`` each find hf-tucker and decompose what was asked."""
    launchers = {"lm_eval": [str(BIN / "lm_eval")], "python-m": [sys.executable, "-m", "lm_eval"], "lm-eval-run": [str(BIN / "lm-eval"), "run"]}
    missing = [name for name, cmd in launchers.items() if cmd[0] != sys.executable and not Path(cmd[0]).exists()]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed")

    def args(name: str) -> list[str]:
        return launchers[name] + [
            "--model", "hf-tucker",
            "--model_args", f"pretrained={tiny_model_dir},dtype=float32,rank=2,layers=2|5,tensors=q|gate",
            "--tasks", "arc_tiny", "--include_path", str(arc_task_dir),
            "--limit", "4", "--device", "cpu", "--batch_size", "4", "--output_path", str(tmp_path / name),
        ]  # fmt: skip

    runs = run_side_by_side(*({"args": args(name), "cwd": tmp_path, "env": ENV, "timeout": 600} for name in launchers))
    for name, r in zip(launchers, runs):
        assert r.returncode == 0, (name, r.stderr[-3000:])
        dec = _results(tmp_path / name)["config"]["lowrank"]["decomposition"]
        assert dec["layers"] == [2, 5] and dec["tensors"] == ["q", "gate"], name
        assert dec["modules"] == ["model.layers.1.self_attn.q_proj", "model.layers.1.mlp.gate_proj", "model.layers.4.self_attn.q_proj", "model.layers.4.mlp.gate_proj"], name


def test_lm_eval_command_ends_a_bad_argument_with_one_line(tiny_model_dir, arc_task_dir, tmp_path):
    args = [
        str(BIN / "lm_eval"), "--model", "hf-tucker",
        "--model_args", f"pretrained={tiny_model_dir},rank=1,layers=7",
        "--tasks", "arc_tiny", "--include_path", str(arc_task_dir), "--limit", "2", "--device", "cpu",
    ]  # fmt: skip
    if not Path(args[0]).exists():
        pytest.skip("lm_eval not installed")
    script = f"from lm_eval_lowrank.harness import HFTuckerLM\nHFTuckerLM(pretrained={str(tiny_model_dir)!r}, rank=1, layers=7)\n"
    # device in model_args and no --device: lm_eval passes device='cuda:0' anyway (with hf a TypeError).
    dup = [a.replace(",layers=7", ",device=cpu") for a in args if a not in ("--device", "cpu")]
    # lm-eval's CLI types layers=0 as an int
    zero = [a.replace(",layers=7", ",layers=0") for a in args]
    common = {"cwd": tmp_path, "env": ENV, "timeout": 600}
    bad, in_script, traced, twice, layer0 = run_side_by_side(
        {"args": args, **common},
        {"args": [sys.executable, "-c", script], **common},
        {"args": args, **common, "env": {**ENV, "LM_EVAL_LOWRANK_TRACEBACK": "1"}},
        {"args": dup, **common},
        {"args": zero, **common},
    )
    assert bad.returncode == 1
    assert "Traceback" not in bad.stderr, bad.stderr[-3000:]
    assert bad.stderr.strip().splitlines()[-1] == "Error: layers='7' is invalid: layer 7 is past the end; this model has 6 decoder layers, valid 1..6"
    # A Python script keeps its traceback: the hook is for the command only.
    assert in_script.returncode == 1 and "Traceback" in in_script.stderr and "SpecError: layers='7' is invalid" in in_script.stderr
    # The traceback stays one variable away.
    assert "Traceback" in traced.stderr and "SpecError: layers='7' is invalid" in traced.stderr
    assert twice.returncode == 1 and "Traceback" not in twice.stderr, twice.stderr[-3000:]
    expected = "Error: device is given twice, 'cpu' in model_args and 'cuda:0' as --device (lm_eval passes 'cuda:0' when --device is left out): give it once, as --device cpu"
    assert twice.stderr.strip().splitlines()[-1] == expected
    assert layer0.returncode == 1
    assert layer0.stderr.strip().splitlines()[-1] == "Error: layers=0 is invalid: layer 0 is out of range; layers are 1-based (the first decoder layer is 1)"


def test_an_argument_given_in_model_args_and_as_an_option_is_one_when_they_agree(monkeypatch, tiny_model_dir):
    """lm-eval calls the model with model_args and the command's options (device, batch_size) as keyword arguments
    side by side: one given both ways was a TypeError even when the two agreed."""
    import transformers

    from lm_eval_lowrank.harness import HFTuckerLM
    from lm_eval_lowrank.spec import SpecError

    lm = HFTuckerLM.create_from_arg_string(f"pretrained={tiny_model_dir},batch_size=2,device=cpu", {"batch_size": 2, "device": "cpu", "max_batch_size": None})
    assert lm.batch_size_per_gpu == 2 and lm.device.type == "cpu"
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("weights were loaded"))
    with pytest.raises(SpecError, match=r"^batch_size is given twice, 4 in model_args and 8 as --batch_size: give it once, as --batch_size 4$"):
        HFTuckerLM.create_from_arg_obj({"pretrained": str(tiny_model_dir), "batch_size": 4}, {"batch_size": 8, "device": "cpu"})
    with pytest.raises(SpecError, match=r"^model_args: rank is given twice; give it once$"):  # lm-eval's parser kept the last
        HFTuckerLM.create_from_arg_string(f"pretrained={tiny_model_dir},rank=8,layers=2,rank=4", {"device": "cpu"})


def test_bad_input_fails_before_weights_load(monkeypatch, tiny_model_dir, tmp_path):
    import transformers

    from lm_eval_lowrank.harness import HFTuckerLM
    from lm_eval_lowrank.spec import SpecError

    def _no_load(*a, **k):
        raise AssertionError("weights were loaded before the arguments were checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", _no_load)
    cases = {
        "layer past the end": ({"rank": 1, "layers": 7}, r"layer 7 is past the end; this model has 6 decoder layers, valid 1..6"),
        "layer zero": ({"rank": 1, "layers": 0}, "1-based"),
        "duplicate": ({"rank": 1, "layers": "2|2"}, "duplicate"),
        "rank zero": ({"rank": 0}, "must be >= 1"),
        "rank text": ({"rank": "big"}, "rank='big'"),
        "rank too big": ({"rank": 100}, r"valid 1..64, and only ranks below 32 save parameters"),
        "tensor": ({"rank": 1, "tensors": "qkv"}, r"valid: q\|k\|v\|o\|gate\|up\|down"),
        "method": ({"rank": 1, "method": "pca"}, "valid methods"),
        "calib_target": ({"rank": 1, "method": "whiten", "calib_target": "ref"}, r"^calib_target='ref' is invalid: valid: compressed, dense, or the weight"),
        "calib_staged": ({"rank": 1, "method": "whiten", "calib_staged": "sometimes"}, r"^calib_staged='sometimes' is invalid: expected true or false$"),
        # typos would otherwise reach from_pretrained as keyword arguments and fail after the load
        "near miss": ({"rank": 1, "layer": 3}, r"^layer=3 is not an argument of hf-tucker: did you mean 'layers'\? its arguments are method, rank"),
        "calib_ prefix": ({"rank": 1, "method": "rom", "calib_samples": 16}, r"^calib_samples=16 is not an argument of hf-tucker: its arguments are"),
        # HFLM's own dtype arguments: lm-eval reads mixed_precision_dtype only after the load
        "dtype": ({"rank": 1, "dtype": "float17"}, r"^dtype='float17' is invalid: valid auto, float32, float16, bfloat16, float64 \(or half, float, double\)$"),
        "not a dtype": ({"rank": 1, "dtype": "nn"}, r"^dtype='nn' is invalid"),
        # torch dtypes a model cannot be built in: from_pretrained's traceback (int8, bool) or torch's (float8)
        **{f"dtype {d}": ({"rank": 1, "dtype": d}, rf"^dtype='{d}' is invalid: valid auto, float32") for d in ("int8", "bool", "float8_e4m3fn", "complex64")},
        "mixed_precision_dtype": ({"rank": 1, "mixed_precision_dtype": "bf16"}, r"^mixed_precision_dtype='bf16' is invalid: valid float32"),
        "softmax_dtype": ({"softmax_dtype": "auto"}, r"^softmax_dtype='auto' is invalid: valid float32"),
        # a missing local path: transformers' "Repo id must use alphanumeric chars", for peft after the load
        "peft path": ({"rank": 1, "peft": "/no/such/adapter"}, r"^peft='/no/such/adapter' is invalid: no such local file or folder"),
        "tokenizer path": ({"rank": 1, "tokenizer": "./no-tokenizer"}, r"^tokenizer='./no-tokenizer' is invalid: no such local file or folder"),
        # HFLM's typed arguments: any string is true to it, and max_length is compared only when it evaluates
        "bool": ({"rank": 1, "parallelize": "maybe"}, r"^parallelize='maybe' is invalid: expected true or false$"),
        "int": ({"rank": 1, "max_length": "abc"}, r"^max_length='abc' is invalid: expected an int$"),
        "literal": ({"rank": 1, "backend": "encoder"}, r"^backend='encoder' is invalid: valid default, causal, seq2seq$"),
        # our own: "no" was a true flag, "abc" a TypeError after the load; case and swapped letters reached from_pretrained
        "measure_energy": ({"rank": 1, "measure_energy": "maybe"}, r"^measure_energy='maybe' is invalid: expected true or false$"),
        "energy_idle_seconds": ({"rank": 1, "energy_idle_seconds": "abc"}, r"^energy_idle_seconds='abc' is invalid: expected seconds >= 0"),
        "negative idle": ({"rank": 1, "energy_idle_seconds": -5}, r"^energy_idle_seconds=-5 is invalid"),
        "case": ({"Rank": 4}, r"^Rank=4 is not an argument of hf-tucker: did you mean 'rank'\?"),
        "swapped letters": ({"rnak": 4}, r"^rnak=4 is not an argument of hf-tucker: did you mean 'rank'\?"),
        # HFLM reads batch_size after the load (int('abc'))
        **{f"batch_size {b!r}": ({"rank": 1, "batch_size": b}, rf"^batch_size={b!r} is invalid: expected an int >= 1, auto, or auto:N") for b in ("abc", 0, "auto:x", "auto:0", "2.5")},
        "shortened": ({"rank": 1, "warmup": 2}, r"^warmup=2 is not an argument of hf-tucker: did you mean 'warmup_calls'\?"),
        "own typo": ({"rank": 1, "measure_enrgy": "false"}, r"^measure_enrgy='false' is not an argument of hf-tucker: did you mean 'measure_energy'\?"),
        "allocator with rank": ({"rank": 2, "allocator": "fisher"}, r"^allocator='fisher' is invalid: it applies to budget=F only"),
    }
    for name, (args, match) in cases.items():
        with pytest.raises(SpecError, match=match):
            HFTuckerLM(pretrained=str(tiny_model_dir), device="cpu", **args)
    # calibration: the source names and the no-leak rule need no weights either (they were checked after the load)
    whiten = {"rank": 1, "layers": 2, "method": "whiten", "calib_n": 2, "calib_len": 16}
    with pytest.raises(SpecError, match=r"^calib='bogus' is invalid: unknown source 'bogus'"):
        HFTuckerLM(pretrained=str(tiny_model_dir), device="cpu", calib="bogus", **whiten)
    with pytest.raises(SpecError, match=r"^calib='' is invalid"):
        HFTuckerLM(pretrained=str(tiny_model_dir), device="cpu", calib="", **whiten)
    # calib_n x calib_len past what the source holds: needs the tokenizer only (it was refused after the load)
    with pytest.raises(SpecError, match=r"^calib_n=100000 is invalid for calib='wikitext_local' at calib_len=16: the source holds only \d+ windows"):
        HFTuckerLM(pretrained=str(tiny_model_dir), device="cpu", **{**whiten, "calib_n": 100000})
    monkeypatch.setenv("LM_EVAL_LOWRANK_EVAL_TASKS", "boolq_local")
    with pytest.raises(SpecError, match=r"^calib='boolq_local' is invalid while evaluating 'boolq_local'"):
        HFTuckerLM(pretrained=str(tiny_model_dir), device="cpu", calib="boolq_local", **whiten)
    with pytest.raises(SpecError, match=r"^pretrained='/no/such/model' is invalid: no such local file or folder; give an existing path or a Hub id"):
        HFTuckerLM(pretrained="/no/such/model", device="cpu", rank=1)
    # transformers' long tracebacks: "Repo id must use alphanumeric chars", "Unrecognized model", "not a valid JSON file"
    with pytest.raises(SpecError, match=r"^pretrained='' is invalid: give a model folder or a Hub id"):
        HFTuckerLM(pretrained="", device="cpu", rank=1)
    not_a_model = tmp_path / "not_a_model"
    not_a_model.mkdir()
    with pytest.raises(SpecError, match=r"^pretrained='.*not_a_model' is invalid: it holds no config.json, so it is not a model folder$"):
        HFTuckerLM(pretrained=str(not_a_model), device="cpu", rank=1)
    with pytest.raises(SpecError, match=r"^pretrained='.*config.json' is invalid: it is a file; give the model's folder"):
        HFTuckerLM(pretrained=str(tiny_model_dir / "config.json"), device="cpu", rank=1)
    with pytest.raises(SpecError, match=r"^pretrained='.*', subfolder='sub': no model config there \(no config.json in '.*/sub'\)$"):
        HFTuckerLM(pretrained=str(tiny_model_dir), subfolder="sub", device="cpu", rank=1)


def test_a_key_nobody_takes_is_a_one_line_error_from_the_model_constructor(tiny_model_dir, monkeypatch):
    """foo=bar passes HFLM and from_pretrained (which keys they and the config consume cannot be listed
    beforehand) and fails in the model's constructor, before any weight is read: a one-line SpecError naming it,
    and so one stop of a sweep rather than an error row per configuration."""
    import safetensors.torch

    from lm_eval_lowrank.harness import HFTuckerLM
    from lm_eval_lowrank.spec import SpecError

    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(SpecError, match=r"^foo='bar' is not an argument of hf-tucker, HFLM, from_pretrained or the model \(.*unexpected keyword argument 'foo'\); hf-tucker's own are method, rank"):
        HFTuckerLM(pretrained=str(tiny_model_dir), device="cpu", rank=1, layers=2, foo="bar")


def test_quantized_weights_are_refused_before_the_load_and_where_they_lie(monkeypatch, tiny_model_dir, tmp_path):
    """A quantized model cannot be factorised as stored: int8/4-bit codes and float8 values without their scales are
    not the weights. From the config, before the weights load (GGUF files load dequantized, so they pass); and on
    the loaded weight itself, naming it. float8 was decomposed silently before, and int8 failed inside autograd."""
    import json

    import torch
    import transformers

    from conftest import tiny_llama_config
    from lm_eval_lowrank.api import compress_model, validate_against_config
    from lm_eval_lowrank.harness import HFTuckerLM
    from lm_eval_lowrank.spec import DecompositionSpec, SpecError

    config = json.loads((tiny_model_dir / "config.json").read_text())
    quantized = tmp_path / "quantized"
    quantized.mkdir()
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("weights were loaded"))
    with pytest.raises(SpecError, match=r"^pretrained is quantized \(quant_method=bitsandbytes\): decomposition needs floating-point weights"):
        HFTuckerLM(pretrained=str(quantized), device="cpu", rank=1)
    gguf = tiny_llama_config()
    gguf.quantization_config = {"quant_method": "gguf"}
    validate_against_config(DecompositionSpec.from_args({"rank": 1}), gguf)  # dequantized as it loads: accepted
    monkeypatch.undo()
    for dtype in (torch.float8_e4m3fn, torch.int8):
        model = transformers.LlamaForCausalLM(tiny_llama_config()).eval()
        q_proj = model.model.layers[1].self_attn.q_proj
        q_proj.weight = torch.nn.Parameter(q_proj.weight.data.to(dtype), requires_grad=False)
        with pytest.raises(SpecError, match=rf"^model.layers.1.self_attn.q_proj.weight is stored quantized \(Parameter of {dtype}\)"):
            compress_model(model, {"rank": 2, "layers": "2", "tensors": "q"}, progress=False)


def test_offloaded_or_tensor_parallel_weights_are_refused_with_the_way_round(tiny_model_dir, tmp_path):
    """parallelize=True with a device map that offloads layers to disk (run here on the CPU): the decomposed
    layer's weight is on the meta device, and the error names it and the way round (a compressed checkpoint, which
    shards and offloads: test_checkpoint). tp_plan shards every weight, refused before anything loads."""
    from lm_eval_lowrank.harness import HFTuckerLM
    from lm_eval_lowrank.spec import SpecError

    device_map = {"model.embed_tokens": "cpu", "lm_head": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu"}
    device_map |= {f"model.layers.{i}": "disk" for i in range(1, 6)}
    with pytest.raises(SpecError, match=r"^model.layers.2.self_attn.q_proj.weight is offloaded .* save a compressed checkpoint first \(lm-eval-lowrank decompose"):
        HFTuckerLM(pretrained=str(tiny_model_dir), device="cpu", parallelize=True, device_map=device_map, offload_folder=str(tmp_path), rank=1, layers=3, tensors="q")
    with pytest.raises(SpecError, match=r"^tp_plan='auto' shards every weight over the processes"):
        HFTuckerLM(pretrained=str(tiny_model_dir), device="cpu", tp_plan="auto", rank=1)


def test_rank_collision_with_hflm_rank_and_passthrough(tiny_model_dir):
    from lm_eval_lowrank.harness import HFTuckerLM

    lm = HFTuckerLM(pretrained=str(tiny_model_dir), device="cpu", dtype="bfloat16", batch_size=3, rank=2, layers="1")
    assert lm.rank == 0  # HFLM's process index, not our rank
    assert lm.decomposition_spec.rank == 2
    assert lm.batch_size == 3 and str(lm.model.dtype) == "torch.bfloat16"
    info = lm.get_model_info()["lowrank"]
    assert info["decomposition"]["ranks"]["model.layers.0.self_attn.q_proj"] == 2


def test_no_rank_is_dense_hf_with_measurements(tiny_model_dir):
    from lm_eval_lowrank.harness import HFTuckerLM

    lm = HFTuckerLM(pretrained=str(tiny_model_dir), device="cpu")
    dec = lm.get_model_info()["lowrank"]["decomposition"]
    assert dec["modules"] == [] and dec["param_reduction"] == 0.0


def test_python_api_without_a_device_picks_one_that_exists(tiny_model_dir):
    # simple_evaluate drops device=None, and HFLM's own default "cuda" fails on a CPU-only torch.
    import lm_eval.api.registry

    from lm_eval_lowrank.harness import HFTuckerLM

    lm = lm_eval.api.registry.get_model("hf-tucker").create_from_arg_obj(
        {"pretrained": str(tiny_model_dir), "rank": 1, "layers": [2, 4]}, {"device": None, "batch_size": 1}
    )
    assert isinstance(lm, HFTuckerLM)
    assert lm.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert lm.get_model_info()["lowrank"]["decomposition"]["layers"] == [2, 4]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a CPU-only torch")
def test_cuda_without_cuda_fails_before_weights_load_and_cuda_0_runs_on_the_cpu_as_hf_does(monkeypatch, tiny_model_dir):
    import transformers

    from lm_eval_lowrank.harness import HFTuckerLM
    from lm_eval_lowrank.spec import SpecError

    from_pretrained = transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("weights loaded"))
    with pytest.raises(SpecError, match=r"^device='cuda' is invalid: this torch .* has no usable CUDA; use device=cpu$"):
        HFTuckerLM(pretrained=str(tiny_model_dir), device="cuda", rank=1)
    # lm_eval's command line passes cuda:0 when --device is left out; hf then runs on the CPU, and so does hf-tucker
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    lm = HFTuckerLM(pretrained=str(tiny_model_dir), device="cuda:0", rank=1, layers="2")
    assert lm.device.type == "cpu" and lm.get_model_info()["lowrank"]["decomposition"]["layers"] == [2]


@pytest.mark.slow
def test_smollm2_through_lm_eval_writes_the_lowrank_block(smollm2_dir, arc_task_dir, tmp_path):
    """The real model, the real harness, rank 1 on all 7 tensors of layers 3, 15 and 28."""
    out = tmp_path / "out"
    args = [
        str(BIN / "lm_eval"), "--model", "hf-tucker",
        "--model_args", f"pretrained={smollm2_dir},dtype=float32,rank=1,layers=3|15|28",
        "--tasks", "arc_tiny", "--include_path", str(arc_task_dir),
        "--limit", "8", "--device", "cpu", "--batch_size", "8", "--output_path", str(out),
    ]  # fmt: skip
    r = _run(args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    res = _results(out)
    assert 0.0 <= res["results"]["arc_tiny"]["acc,none"] <= 1.0
    low = res["config"]["lowrank"]
    dec = low["decomposition"]
    assert dec["method"] == "tucker" and dec["rank"] == 1 and dec["layers"] == [3, 15, 28]
    assert dec["tensors"] == ["q", "k", "v", "o", "gate", "up", "down"]
    assert len(dec["modules"]) == 21 and dec["modules"][0] == "model.layers.2.self_attn.q_proj"
    # SmolLM2: q,o 576x576; k,v 192x576; gate,up 1536x576; down 576x1536 -> rank-1 factors r(m+n)
    dense = 2 * 576 * 576 + 2 * 192 * 576 + 3 * 1536 * 576
    low_r = 2 * (576 + 576) + 2 * (192 + 576) + 3 * (1536 + 576)
    assert dec["params_before"] == 134_515_008
    assert dec["params_before"] - dec["params_after"] == 3 * (dense - low_r)
    assert abs(dec["param_reduction"] - 3 * (dense - low_r) / 134_515_008) < 1e-12
    assert dec["decomposition_seconds"] > 0
    assert res["config"]["model_num_parameters"] == dec["params_after"]
    lat = low["latency"]
    assert lat["timer"] == "perf_counter" and lat["calls"] >= 1 and lat["tokens"] > 0
    assert lat["tokens_per_second"] > 0 and lat["mean_seconds_per_batch"] > 0
    if low["energy"]["available"]:  # a host whose RAPL counters are readable
        assert low["energy"]["method"] == "rapl_energy_counter" and low["energy"]["total_joules"] >= 0
    else:
        assert low["energy"]["total_joules"] is None and low["energy"]["reason"]
    assert low["memory"]["bytes"] > 100_000_000
    assert low["versions"]["lm-eval-lowrank"] and low["versions"]["torch"] and low["versions"]["lm_eval"]


def test_generate_is_measured_with_new_tokens_only(tiny_model_dir):
    import torch

    from lm_eval_lowrank.harness import HFTuckerLM

    lm = HFTuckerLM(pretrained=str(tiny_model_dir), device="cpu", rank=2, layers="1")
    ctx = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    out = lm._model_generate(ctx, max_length=10, stop=["never-appears"], do_sample=False)
    lm._sync_measurements()
    gen = lm.get_model_info()["lowrank"]["latency"]["by_kind"]["generate"]
    assert gen["calls"] == 1 and gen["tokens"] == (out.shape[1] - 4) * 2 and gen["seconds"] > 0


def test_a_cpu_run_reports_rapl_energy_in_the_results(tiny_model_dir, tmp_path, monkeypatch):
    """CPU energy through the harness, from a fake powercap tree whose package draws 100 W."""
    import threading

    import torch

    from lm_eval_lowrank import measure
    from lm_eval_lowrank.harness import HFTuckerLM

    pkg = tmp_path / "intel-rapl:0"
    pkg.mkdir()
    (pkg / "name").write_text("package-0\n")
    (pkg / "max_energy_range_uj").write_text("262143328850\n")
    (pkg / "energy_uj").write_text("0\n")
    monkeypatch.setattr(measure, "RAPL_ROOT", tmp_path)
    lm = HFTuckerLM(pretrained=str(tiny_model_dir), device="cpu", rank=2, layers="1", energy_idle_seconds=0)
    stop = threading.Event()

    def draw():
        uj = 0
        while not stop.wait(0.01):
            uj += 1_000_000
            (pkg / "energy_uj").write_text(f"{uj}\n")

    writer = threading.Thread(target=draw)
    writer.start()
    try:
        for _ in range(3):
            lm._model_call(torch.randint(0, 100, (2, 16)))
            stop.wait(0.05)
    finally:
        stop.set()
        writer.join()
    lm._sync_measurements()
    low = lm.get_model_info()["lowrank"]
    lm._meter.energy.close()
    e = low["energy"]
    assert e["available"] and e["method"] == "rapl_energy_counter"
    assert list(e["per_rapl_zone"].values())[0]["name"] == "package-0"
    assert e["total_joules"] >= 5.0  # >= 0.15 s at 100 W, less the writer's oversleeping
    assert e["joules_per_token"] == e["total_joules"] / low["latency"]["tokens"] and low["latency"]["tokens"] == 96


def test_two_runs_time_the_same_batches_so_compare_pairs_them(tiny_model_dir, arc_task_dir):
    """lm-eval orders its requests the same way each run: a dense and a decomposed run time the same batches,
    call by call, which is what the paired latency ratio in ``compare`` needs."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from lm_eval_lowrank.latency_stats import LatencyRatio, latency_ratio
    from lm_eval_lowrank.harness import HFTuckerLM

    tm = TaskManager(include_path=str(arc_task_dir))
    blocks = []
    for extra in ({}, {"rank": 2, "layers": "2|5"}):
        lm = HFTuckerLM(pretrained=str(tiny_model_dir), device="cpu", dtype="float32", batch_size=2, **extra)
        simple_evaluate(model=lm, tasks=["arc_tiny"], task_manager=tm, limit=6, bootstrap_iters=0)
        blocks.append(lm.get_model_info()["lowrank"]["latency"])
    dense, low = blocks
    assert dense["calls"] == low["calls"] >= 9  # 24 requests (6 documents x 4 choices), up to 2 per batch
    assert dense["per_call_tokens"] == low["per_call_tokens"] and sum(low["per_call_tokens"]) == low["tokens"]
    got = latency_ratio(dense, low)
    assert isinstance(got, LatencyRatio) and got.calls == low["calls"] and got.lower <= got.ratio <= got.upper
    assert abs(got.ratio - low["total_seconds"] / dense["total_seconds"]) < 1e-5


GEN_TASK_YAML = """task: gen_tiny
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    test: {data}
output_type: generate_until
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answerKey}}}}"
generation_kwargs:
  until: ["\\n\\n"]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def test_a_model_evaluated_twice_reports_each_evaluation_on_its_own(tiny_model_dir, arc_task_dir, tmp_path):
    """lm-eval's simple_evaluate called twice on one loaded model: the second JSON held both evaluations' forwards
    (its meter ran from the load). Generate calls are also identified by their inputs, so that two models'
    runs pair even when they generate different lengths."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from lm_eval_lowrank.harness import HFTuckerLM
    from lm_eval_lowrank.tasks import data_dir

    (tmp_path / "gen_tiny.yaml").write_text(GEN_TASK_YAML.format(data=data_dir() / "arc_easy" / "test.jsonl"))
    tm = TaskManager(include_path=[str(arc_task_dir), str(tmp_path)])
    lm = HFTuckerLM(pretrained=str(tiny_model_dir), device="cpu", dtype="float32", batch_size=2, max_length=128, measure_energy=False)
    first = simple_evaluate(model=lm, tasks=["arc_tiny"], task_manager=tm, limit=3, bootstrap_iters=0)["config"]["lowrank"]
    second = simple_evaluate(model=lm, tasks=["gen_tiny"], task_manager=tm, limit=2, bootstrap_iters=0)["config"]["lowrank"]
    assert first["evaluation"] == 1 and set(first["latency"]["by_kind"]) == {"model_call"} and first["latency"]["calls"] == 6
    lat = second["latency"]
    assert second["evaluation"] == 2 and set(lat["by_kind"]) == {"generate"} and lat["calls"] == 1
    assert lat["tokens"] == sum(lat["per_call_tokens"]) <= 2 * 4  # new tokens only: 2 documents, 4 at most each
    assert lat["per_call_input_tokens"][0] > lat["per_call_tokens"][0]  # the prompts' tokens identify the batch
    assert first["latency"]["per_call_input_tokens"] == first["latency"]["per_call_tokens"]
    assert lm.get_model_info()["lowrank"]["evaluation"] == 2  # reporting again starts nothing new


def test_the_load_peak_is_the_loads_own_not_an_earlier_evaluations(tiny_model_dir, monkeypatch):
    """decomposition.load_peak_memory_bytes read CUDA's peak since the last reset: a second model loaded in one
    process reported the first model's evaluation peak as its load peak. Fake allocator counters, torch's
    semantics (the peak since the last reset)."""
    from lm_eval.models.huggingface import HFLM

    from lm_eval_lowrank.harness import HFTuckerLM

    mib = 1 << 20
    state = {"now": 0, "peak": 0, "loaded": False}

    def allocate(n):
        state["now"] += n
        state["peak"] = max(state["peak"], state["now"])

    def reset(i=None):
        state["peak"] = state["now"]

    real_init = HFLM.__init__

    def init_on_fake_gpu(self, *a, **k):
        state["loaded"] = False
        real_init(self, *a, **{**k, "device": "cpu"})
        state["loaded"] = True
        allocate(500 * mib)  # the weights

    monkeypatch.setattr(torch.cuda, "is_available", lambda: state["loaded"])
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda i=None: state["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    monkeypatch.setattr(HFLM, "__init__", init_on_fake_gpu)
    monkeypatch.setattr(HFTuckerLM, "device", property(lambda self: torch.device("cuda:0") if state["loaded"] else self._device))
    lm = HFTuckerLM(pretrained=str(tiny_model_dir), measure_energy=False, device="cuda:0")
    assert lm._lowrank_report["load_peak_memory_bytes"] == 500 * mib
    allocate(4000 * mib)  # its evaluation
    state["now"] -= 4500 * mib  # then it is freed
    del lm
    lm = HFTuckerLM(pretrained=str(tiny_model_dir), measure_energy=False, device="cuda:0")
    assert lm._lowrank_report["load_peak_memory_bytes"] == 500 * mib


def test_warmup_calls_run_the_first_batch_untimed_in_each_evaluation(tiny_model_dir, arc_task_dir, tmp_path):
    """CUDA's first call loads kernels and sets up cuBLAS: inside the first timed call it inflated the latency of
    every run alike. warmup_calls=N runs the first batch N times untimed (two new tokens before a generate call),
    counted apart from the timed calls and the batch-size probes."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from lm_eval_lowrank.harness import HFTuckerLM
    from lm_eval_lowrank.spec import SpecError
    from lm_eval_lowrank.tasks import data_dir

    (tmp_path / "gen_tiny.yaml").write_text(GEN_TASK_YAML.format(data=data_dir() / "arc_easy" / "test.jsonl"))
    tm = TaskManager(include_path=[str(arc_task_dir), str(tmp_path)])
    runs = {}
    for warmup in (0, 2):
        lm = HFTuckerLM(pretrained=str(tiny_model_dir), device="cpu", dtype="float32", batch_size=2, max_length=128, measure_energy=False, warmup_calls=str(warmup))
        forwards = []
        lm.model.register_forward_hook(lambda mod, args, out: forwards.append(args[0].shape if args else None))
        arc = simple_evaluate(model=lm, tasks=["arc_tiny"], task_manager=tm, limit=3, bootstrap_iters=0)
        arc_forwards = len(forwards)
        gen = simple_evaluate(model=lm, tasks=["gen_tiny"], task_manager=tm, limit=2, bootstrap_iters=0)
        runs[warmup] = (arc, gen, arc_forwards, forwards)
    (arc0, gen0, n0, fw0), (arc2, gen2, n2, fw2) = runs[0], runs[2]
    lat0, lat2 = arc0["config"]["lowrank"]["latency"], arc2["config"]["lowrank"]["latency"]
    assert lat0["warmup_calls"] == 0 and lat2["warmup_calls"] == 2
    assert lat0["calls"] == lat2["calls"] == 6 and lat0["excluded_calls"] == lat2["excluded_calls"] == 0
    assert lat2["per_call_input_tokens"] == lat0["per_call_input_tokens"]  # the timed calls are the same batches
    assert n2 == n0 + 2 and fw2[0] == fw2[1] == fw2[2]  # the first batch thrice: two untimed, then timed
    g0, g2 = gen0["config"]["lowrank"]["latency"], gen2["config"]["lowrank"]["latency"]
    assert g2["warmup_calls"] == 2 and g0["warmup_calls"] == 0 and g2["calls"] == g0["calls"] == 1  # again for the new evaluation
    assert g2["per_call_input_tokens"] == g0["per_call_input_tokens"]
    assert (len(fw2) - n2) - (len(fw0) - n0) == 2 * 2  # each generate warm-up: the prompts' forward and one decoding step
    assert arc2["results"]["arc_tiny"]["acc,none"] == arc0["results"]["arc_tiny"]["acc,none"]
    for bad in ("-1", "abc", "1.5"):
        with pytest.raises(SpecError, match=r"^warmup_calls=.*expected auto or an int >= 0"):
            HFTuckerLM(pretrained=str(tiny_model_dir), device="cpu", warmup_calls=bad)
