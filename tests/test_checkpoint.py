"""Compressed checkpoints and the decomposition cache, on a tiny random Llama (tied embeddings)."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_llama_config

BIN = Path(sys.executable).parent
SPEC = {"rank": 4, "layers": "1|3"}
WORDS = "the a of and to in is was for on that with as by at from it an be this are or his her which".split()


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w in WORDS + [f"w{i}" for i in range(90)]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>")


def make_tiny_dir(path: Path) -> Path:
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    cfg = tiny_llama_config(tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_dir(tmp_path_factory.mktemp("tiny_src"))


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LM_EVAL_LOWRANK_CACHE", str(tmp_path / "cache"))


INPUT = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT).logits


def load_dense(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


def compress(path: Path, **extra):
    from lm_eval_lowrank.api import compress_model

    model = load_dense(path)
    report = compress_model(model, {**SPEC, **extra}, model_id=str(path), progress=False)
    return model, report


@pytest.fixture(scope="module")
def saved(tiny_dir, tmp_path_factory):
    """(checkpoint dir, logits of the decompose-on-load model, report)."""
    from transformers import AutoTokenizer

    from lm_eval_lowrank.api import compress_model
    from lm_eval_lowrank.checkpoint import save_compressed

    model = load_dense(tiny_dir)
    report = compress_model(model, {**SPEC, "cache": False}, progress=False)
    out = tmp_path_factory.mktemp("ckpt") / "c"
    save_compressed(model, out, report, tokenizer=AutoTokenizer.from_pretrained(str(tiny_dir)), source={"model_id": str(tiny_dir)})
    return out, logits(model), report


def copy_ckpt(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# -- round trip --------------------------------------------------------------------------------


def test_round_trip_gives_identical_logits_and_tied_embeddings(saved):
    from lm_eval_lowrank.checkpoint import load_compressed
    from lm_eval_lowrank.modules import LowRankLinear

    out, expected, report = saved
    model = load_compressed(out)
    assert torch.equal(logits(model), expected)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    lowrank = {n for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert lowrank == set(report.plan.module_names())
    assert not any(p.device.type == "meta" for p in model.parameters())
    assert not any(b.device.type == "meta" for b in model.buffers())


def test_hf_tucker_loads_checkpoint_like_decompose_on_load(saved, tiny_dir):
    from lm_eval_lowrank.harness import HFTuckerLM

    out, _, _ = saved
    on_load = HFTuckerLM(pretrained=str(tiny_dir), device="cpu", dtype="float32", cache=False, **SPEC)
    from_ckpt = HFTuckerLM(pretrained=str(out), device="cpu", dtype="float32")
    assert torch.equal(logits(from_ckpt.model), logits(on_load.model))
    rep = from_ckpt.lowrank_info()["decomposition"]
    assert rep["loaded_from_checkpoint"] == str(out)
    assert rep["modules"] == on_load.lowrank_info()["decomposition"]["modules"]
    assert rep["decomposition_seconds"] == 0.0


def _offloading_map(model) -> dict[str, str]:
    """Embeddings and the first decoder layer in memory, every other layer on disk (run on the CPU)."""
    layers = len(model.model.layers)
    return {"model.embed_tokens": "cpu", "lm_head": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu"} | {
        f"model.layers.{i}": "disk" for i in range(1, layers)
    }


def test_a_checkpoint_loads_over_a_device_map_with_offload_like_on_one_device(saved, tmp_path):
    """device_map strategies and a mapping that offloads layers to disk give the one-device model's logits."""
    from lm_eval_lowrank.checkpoint import load_compressed

    out, expected, _ = saved
    for strategy in ("auto", "balanced", "sequential"):
        model = load_compressed(out, device_map=strategy)
        assert torch.equal(logits(model), expected) and model.lm_head.weight is model.model.embed_tokens.weight
    device_map = _offloading_map(load_compressed(out))
    model = load_compressed(out, device_map=device_map, offload_folder=tmp_path / "offload")
    assert model.hf_device_map == device_map and next(model.model.layers[1].parameters()).is_meta  # on disk
    assert torch.equal(logits(model), expected)


def test_bad_device_maps_for_a_checkpoint_fail_in_one_line(saved):
    from lm_eval_lowrank.checkpoint import CheckpointError, load_compressed

    out, _, _ = saved
    model = load_compressed(out)
    for kwargs, words in (
        ({"device_map": "everywhere"}, "device_map='everywhere' is invalid: valid auto, balanced, balanced_low_0, sequential"),
        ({"device_map": _offloading_map(model)}, "offload_folder is required"),
        ({"device_map": "sequential", "max_memory": {"cpu": 1000}}, "max_memory={'cpu': 1000} leaves no device room"),
    ):
        with pytest.raises(CheckpointError) as err:
            load_compressed(out, **kwargs)
        assert _one_line(err.value).startswith(words)


def test_each_tensor_is_read_to_the_device_its_module_is_mapped_to():
    """The longest mapped prefix wins, on whole path components (layers.1 is not a prefix of layers.10);
    disk-mapped tensors are read to the CPU, which dispatch then offloads."""
    from lm_eval_lowrank.checkpoint import CheckpointError, _placed_device

    device_map = {"": 0, "model.layers.1": 1, "model.layers.1.mlp": "cpu", "lm_head": "disk"}
    assert _placed_device("model.layers.10.mlp.down_proj.first", device_map) == torch.device("cuda", 0)
    assert _placed_device("model.layers.1.self_attn.q_proj.last", device_map) == torch.device("cuda", 1)
    assert _placed_device("model.layers.1.mlp.experts.down_proj.first", device_map) == torch.device("cpu")
    assert _placed_device("lm_head.weight", device_map) == torch.device("cpu")
    with pytest.raises(CheckpointError, match="device_map places no module of model.norm.weight"):
        _placed_device("model.norm.weight", {"model.layers": 0})


def test_hf_tucker_shards_a_checkpoint_with_parallelize_and_refuses_dense_only_args(saved, tmp_path):
    """parallelize=True reaches the checkpoint (before, HFLM was given a built model and refused it with an
    assertion); arguments that only apply to reading a dense model fail before anything loads."""
    from lm_eval_lowrank.checkpoint import load_compressed
    from lm_eval_lowrank.harness import HFTuckerLM
    from lm_eval_lowrank.spec import SpecError

    out, expected, _ = saved
    device_map = _offloading_map(load_compressed(out))
    lm = HFTuckerLM(pretrained=str(out), device="cpu", parallelize=True, device_map=device_map, offload_folder=str(tmp_path / "off"), measure_energy=False)
    assert lm.model.hf_device_map == device_map
    assert torch.equal(logits(lm.model), expected)
    info = lm.lowrank_info()["decomposition"]
    assert info["loaded_from_checkpoint"] == str(out) and info["model_devices"] == ["cpu"]  # where the offloaded layers run
    for arg in ({"peft": "some/adapter"}, {"revision": "v2"}, {"gguf_file": "model.gguf"}):
        with pytest.raises(SpecError, match=f"^{next(iter(arg))}=.* cannot apply to pretrained=.*a compressed checkpoint"):
            HFTuckerLM(pretrained=str(out), device="cpu", **arg)


def test_hf_tucker_refuses_a_checkpoint_calibrated_on_an_evaluated_split_before_loading(saved, tmp_path, monkeypatch):
    from lm_eval_lowrank.calibration import EVAL_TASKS_ENV
    from lm_eval_lowrank.checkpoint import MANIFEST_NAME, CompressedCheckpoint
    from lm_eval_lowrank.harness import HFTuckerLM
    from lm_eval_lowrank.spec import SpecError
    from lm_eval_lowrank.tasks import DataDirError, data_dir

    try:
        data_dir()
    except DataDirError:
        pytest.skip("benchmark data folder not available")
    ck = copy_ckpt(saved[0], tmp_path / "c")
    m = json.loads((ck / MANIFEST_NAME).read_text())
    m["decomposition"]["calibration"] = {"source": "wikitext_local", "leak_check": {"status": "unchecked", "calib_files": ["wikitext/test.jsonl"]}}
    (ck / MANIFEST_NAME).write_text(json.dumps(m))
    monkeypatch.setattr(CompressedCheckpoint, "load_model", lambda *a, **k: pytest.fail("weights loaded before the no-leak check"))
    monkeypatch.setenv(EVAL_TASKS_ENV, "wikitext_local")
    with pytest.raises(SpecError, match="read wikitext/test.jsonl, which wikitext_local scores"):
        HFTuckerLM(pretrained=str(ck), device="cpu", dtype="float32")
    monkeypatch.undo()
    monkeypatch.setenv(EVAL_TASKS_ENV, "arc_easy_local")
    lm = HFTuckerLM(pretrained=str(ck), device="cpu", dtype="float32")
    assert lm.lowrank_info()["decomposition"]["leak_check"]["status"] == "ok"


def test_manifest_records_the_decomposition(saved, tiny_dir):
    from lm_eval_lowrank import __version__
    from lm_eval_lowrank.checkpoint import MANIFEST_NAME, WEIGHTS_NAME, sha256_file

    out, _, report = saved
    m = json.loads((out / MANIFEST_NAME).read_text())
    assert m["method"] == "tucker" and m["layout"] == "folded"
    assert m["layers"] == [1, 3] and m["tensors"] == ["q", "k", "v", "o", "gate", "up", "down"]
    assert m["ranks"] == report.plan.ranks()
    assert m["source"]["model_id"] == str(tiny_dir)
    assert m["package_version"] == __version__
    assert m["weights"][WEIGHTS_NAME]["sha256"] == sha256_file(out / WEIGHTS_NAME)
    assert m["params"]["before"] == report.params_before and m["params"]["after"] == report.params_after
    assert m["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    # factors only: no dense weight of a decomposed module, and the tokenizer travels along
    from safetensors import safe_open

    with safe_open(str(out / WEIGHTS_NAME), "pt") as f:
        keys = set(f.keys())
    for path in report.plan.module_names():
        assert f"{path}.first" in keys and f"{path}.last" in keys and f"{path}.weight" not in keys
    assert "lm_head.weight" not in keys
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()


def test_checkpoint_is_smaller_by_the_parameter_reduction(saved, tiny_dir):
    from lm_eval_lowrank.checkpoint import CompressedCheckpoint

    out, _, report = saved
    dense = sum(p.stat().st_size for p in tiny_dir.glob("*.safetensors"))
    ratio = CompressedCheckpoint.open(out).weight_bytes() / dense
    expected = report.params_after / report.params_before
    assert expected < 0.75
    assert ratio == pytest.approx(expected, abs=0.02)


def test_plain_from_pretrained_does_not_load_it_silently(saved):
    from transformers import AutoModelForCausalLM

    out, _, _ = saved
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained(str(out))


def test_detect_is_none_for_dense_folders(tiny_dir, tmp_path):
    from lm_eval_lowrank.checkpoint import CompressedCheckpoint

    assert CompressedCheckpoint.detect(str(tiny_dir)) is None
    assert CompressedCheckpoint.detect(str(tmp_path / "nope")) is None
    assert CompressedCheckpoint.detect("HuggingFaceTB/SmolLM2-135M") is None


def test_save_refuses_to_clobber_a_foreign_folder(saved, tiny_dir, tmp_path):
    from lm_eval_lowrank.checkpoint import CheckpointError, load_compressed, save_compressed

    out, _, _ = saved
    model = load_compressed(out)
    from lm_eval_lowrank.checkpoint import CompressedCheckpoint

    dec = CompressedCheckpoint.open(out).manifest["decomposition"]
    with pytest.raises(CheckpointError, match="not empty"):
        save_compressed(model, tiny_dir, dec)
    with pytest.raises(CheckpointError, match="not a compressed checkpoint"):
        save_compressed(model, tiny_dir, dec, overwrite=True)
    again = save_compressed(model, tmp_path / "again", dec)
    assert torch.equal(logits(load_compressed(again)), logits(model))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


# -- integrity -----------------------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert "\n" not in msg
    return msg


def test_corrupted_weights_are_refused(saved, tmp_path):
    from lm_eval_lowrank.checkpoint import WEIGHTS_NAME, CheckpointError, load_compressed

    ck = copy_ckpt(saved[0], tmp_path / "c")
    f = ck / WEIGHTS_NAME
    data = bytearray(f.read_bytes())
    data[-100] ^= 0xFF  # a flipped byte in tensor data, size unchanged
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as ei:
        load_compressed(ck)
    assert "sha256" in _one_line(ei.value) and str(f) in str(ei.value)


def test_verify_rehash_finds_a_change_that_kept_size_mtime_and_inode(saved, tmp_path):
    """The memoised digest is keyed by (size, mtime, inode): an in-place write that restores the mtime passes a
    load, and verify(rehash=True) is the way to find it."""
    import os

    from lm_eval_lowrank.checkpoint import WEIGHTS_NAME, CheckpointError, CompressedCheckpoint

    ck = copy_ckpt(saved[0], tmp_path / "c")
    f = ck / WEIGHTS_NAME
    CompressedCheckpoint.open(ck).verify()  # remembers the digest of this version
    st = os.stat(f)
    with open(f, "r+b") as fh:  # in place: same inode, same size
        fh.seek(st.st_size - 100)
        byte = fh.read(1)
        fh.seek(st.st_size - 100)
        fh.write(bytes([byte[0] ^ 0xFF]))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    CompressedCheckpoint.open(ck).verify()  # the remembered digest: not seen
    with pytest.raises(CheckpointError, match="fails its sha256 check"):
        CompressedCheckpoint.open(ck).verify(rehash=True)


def test_weights_are_hashed_once_per_file_version_then_corruption_is_still_caught(saved, tmp_path, monkeypatch):
    from lm_eval_lowrank import checkpoint as ck_mod
    from lm_eval_lowrank.checkpoint import WEIGHTS_NAME, CheckpointError, load_compressed

    ck = copy_ckpt(saved[0], tmp_path / "c")
    calls = []
    real = ck_mod.sha256_file
    monkeypatch.setattr(ck_mod, "sha256_file", lambda p, *a: calls.append(p) or real(p, *a))
    load_compressed(ck)
    load_compressed(ck)
    assert len(calls) == 1  # the second load reuses the digest of the unchanged file
    f = ck / WEIGHTS_NAME
    data = bytearray(f.read_bytes())
    data[-100] ^= 0xFF  # same size; the rewrite changes mtime
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        load_compressed(ck)
    assert len(calls) == 2


def test_truncated_weights_are_refused(saved, tmp_path):
    from lm_eval_lowrank.checkpoint import WEIGHTS_NAME, CheckpointError, load_compressed

    ck = copy_ckpt(saved[0], tmp_path / "c")
    f = ck / WEIGHTS_NAME
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(CheckpointError) as ei:
        load_compressed(ck)
    assert "truncated" in _one_line(ei.value)


def test_manifest_that_does_not_match_the_weights_is_refused(saved, tmp_path):
    from lm_eval_lowrank.checkpoint import MANIFEST_NAME, CheckpointError, load_compressed

    ck = copy_ckpt(saved[0], tmp_path / "c")
    mpath = ck / MANIFEST_NAME
    m = json.loads(mpath.read_text())
    first = next(iter(m["modules"]))
    m["modules"][first]["rank"] = 5
    m["ranks"][first] = 5
    mpath.write_text(json.dumps(m))
    with pytest.raises(CheckpointError) as ei:
        load_compressed(ck)
    assert "does not match the weights" in _one_line(ei.value) and first in str(ei.value)


def test_damaged_manifest_is_refused_not_ignored(saved, tmp_path):
    from lm_eval_lowrank.checkpoint import MANIFEST_NAME, CheckpointError, CompressedCheckpoint

    ck = copy_ckpt(saved[0], tmp_path / "c")
    (ck / MANIFEST_NAME).write_text('{"format": "lm-eval-lowrank/compressed", "weights": ')
    with pytest.raises(CheckpointError, match="not valid JSON"):
        CompressedCheckpoint.detect(str(ck))


# -- the decomposition cache ---------------------------------------------------------------------


def test_cache_miss_then_hit_with_identical_logits(tiny_dir):
    m1, r1 = compress(tiny_dir)
    assert r1.cache["enabled"] and not r1.cache["hit"] and r1.cache["stored"]
    assert Path(r1.cache["path"]).is_file()
    m2, r2 = compress(tiny_dir)
    assert r2.cache["hit"] and r2.cache["key"] == r1.cache["key"]
    assert torch.equal(logits(m1), logits(m2))
    assert r2.to_dict()["modules"] == r1.to_dict()["modules"] and r2.params_after == r1.params_after
    assert r1.sv_error_bound_modules > 0 and (r2.sv_error_bound, r2.sv_error_bound_modules) == (r1.sv_error_bound, r1.sv_error_bound_modules)
    assert m2.lm_head.weight is m2.model.embed_tokens.weight


def test_cache_key_follows_the_configuration_and_weights(tiny_dir):
    _, base = compress(tiny_dir)
    _, other_rank = compress(tiny_dir, rank=3)
    _, other_seed = compress(tiny_dir, seed=1)
    assert len({base.cache["key"], other_rank.cache["key"], other_seed.cache["key"]}) == 3
    assert not other_rank.cache["hit"] and not other_seed.cache["hit"]
    # weights changed in memory after loading (e.g. a merged delta) must not reuse factors
    from lm_eval_lowrank.api import compress_model

    model = load_dense(tiny_dir)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.add_(0.01)
    r = compress_model(model, SPEC, model_id=str(tiny_dir), progress=False)
    assert not r.cache["hit"] and r.cache["key"] != base.cache["key"]
    # a new version of the algorithms computes other factors: an old entry is not reused
    from lm_eval_lowrank import checkpoint as ck

    before = ck.ALGORITHM_VERSION
    ck.ALGORITHM_VERSION = before + 1
    try:
        _, newer = compress(tiny_dir)
    finally:
        ck.ALGORITHM_VERSION = before
    assert not newer.cache["hit"] and newer.cache["key"] != base.cache["key"]


def test_cache_off_with_cache_false(tiny_dir):
    _, r = compress(tiny_dir, cache=False)
    assert not (r.cache or {}).get("hit")
    cache_dir = Path(os.environ["LM_EVAL_LOWRANK_CACHE"]) / "decomp"
    assert not list(cache_dir.rglob("*.safetensors")) if cache_dir.exists() else True


def test_source_hashes_are_memoised_by_size_and_mtime(tiny_dir, tmp_path, monkeypatch):
    from lm_eval_lowrank import checkpoint as ck

    calls = []
    real = ck.sha256_file
    monkeypatch.setattr(ck, "sha256_file", lambda p, *a: calls.append(p) or real(p, *a))
    idx = ck.FileHashIndex(tmp_path / "idx.json")
    f = tmp_path / "w.safetensors"
    f.write_bytes(b"abc")
    d1 = idx.digest(f)
    assert idx.digest(f) == d1 and len(calls) == 1
    f.write_bytes(b"abcd")
    assert idx.digest(f) != d1 and len(calls) == 2


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_cache_entry_is_recomputed_with_a_warning(tiny_dir, damage):
    m1, r1 = compress(tiny_dir)
    entry = Path(r1.cache["path"])
    data = bytearray(entry.read_bytes())
    if damage == "flip":
        data[-50] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    entry.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="recomputing"):
        m2, r2 = compress(tiny_dir)
    assert not r2.cache["hit"] and r2.cache["stored"]
    assert torch.equal(logits(m1), logits(m2))
    _, r3 = compress(tiny_dir)  # the rewritten entry is whole again
    assert r3.cache["hit"]


def test_cache_entry_is_hashed_once_per_file_version(tiny_dir, monkeypatch):
    from lm_eval_lowrank import checkpoint as ck

    m1, r1 = compress(tiny_dir)  # the writer records the digest of what it wrote
    calls = []
    real = ck._tensor_digest
    monkeypatch.setattr(ck, "_tensor_digest", lambda t: calls.append(1) or real(t))
    m2, r2 = compress(tiny_dir)
    assert r2.cache["hit"] and calls == []
    assert torch.equal(logits(m1), logits(m2))
    # a rewritten entry (same bytes, new mtime/inode) is hashed again, and remembered
    entry = Path(r1.cache["path"])
    data = entry.read_bytes()
    entry.unlink()
    entry.write_bytes(data)
    _, r3 = compress(tiny_dir)
    _, r4 = compress(tiny_dir)
    assert r3.cache["hit"] and r4.cache["hit"] and len(calls) == 1


def test_cache_hit_parameters_are_the_read_tensors_with_checked_shapes():
    from lm_eval_lowrank.modules import LowRankLinear

    t = {"first": torch.randn(3, 10), "last": torch.randn(7, 3), "bias": torch.randn(7)}
    m = LowRankLinear.from_parameters(t, 10, 7)
    assert m.first.data_ptr() == t["first"].data_ptr() and m.bias.data_ptr() == t["bias"].data_ptr()
    x = torch.randn(2, 10)
    assert torch.allclose(m(x), x @ t["first"].T @ t["last"].T + t["bias"], atol=1e-6)
    with pytest.raises(ValueError, match="does not fit"):
        LowRankLinear.from_parameters({"first": torch.randn(3, 9), "last": torch.randn(7, 3)}, 10, 7)
    with pytest.raises(ValueError, match="no tensor for core"):
        LowRankLinear.from_parameters({"first": torch.randn(3, 10), "last": torch.randn(7, 3)}, 10, 7, layout="tucker")


def test_cache_entries_are_mapped_privately_and_match_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    from lm_eval_lowrank.checkpoint import _map_safetensors

    tensors = {"a.first": torch.randn(3, 5), "a.last": torch.randn(7, 3, dtype=torch.float64), "b.bias": torch.randn(4).to(torch.bfloat16)}
    f = tmp_path / "e.safetensors"
    save_file(tensors, str(f), metadata={"key": "k"})
    mapped, meta = _map_safetensors(f)
    assert meta == {"key": "k"} and set(mapped) == set(tensors)
    for k, t in load_file(str(f)).items():
        assert mapped[k].dtype == t.dtype and torch.equal(mapped[k], t)
    before = f.read_bytes()
    mapped["a.first"].add_(1.0)  # e.g. healing a model loaded from the cache
    assert f.read_bytes() == before
    # a dtype the mapper does not know is read through safetensors instead
    odd = {"x": torch.arange(3, dtype=torch.int8), "y": torch.randn(2, 2)}
    save_file(odd, str(tmp_path / "odd.safetensors"))
    got, _ = _map_safetensors(tmp_path / "odd.safetensors")
    assert all(torch.equal(got[k], odd[k]) for k in odd)
    (tmp_path / "cut.safetensors").write_bytes(before[: len(before) - 8])
    with pytest.raises(ValueError, match="out of bounds"):
        _map_safetensors(tmp_path / "cut.safetensors")


def _concurrent_writer(src: str, cache: str, rounds: int, barrier) -> None:
    os.environ["LM_EVAL_LOWRANK_CACHE"] = cache
    from transformers import AutoModelForCausalLM

    from lm_eval_lowrank.api import as_spec
    from lm_eval_lowrank.checkpoint import DecompositionCache
    from lm_eval_lowrank.decompose import decompose_model

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    cache_obj = DecompositionCache.for_model(model, src)
    spec = as_spec(SPEC)
    assert cache_obj.try_load(model, spec) is None  # a miss fingerprints the dense weights
    pending = cache_obj._pending[id(model)]
    report = decompose_model(model, spec, progress=False)
    barrier.wait()  # both processes write the same entry at the same moment, repeatedly
    for _ in range(rounds):
        cache_obj._pending[id(model)] = pending
        report.cache = None
        assert cache_obj.store(model, report) is not None


def test_concurrent_cache_writes_leave_a_whole_entry(tiny_dir, tmp_path):
    cache = str(tmp_path / "cache")
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_concurrent_writer, args=(str(tiny_dir), cache, 15, barrier)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert [p.exitcode for p in procs] == [0, 0]
    entries = list(Path(cache, "decomp").rglob("*.safetensors"))
    assert len(entries) == 1
    assert not [p for p in Path(cache, "decomp").rglob("*") if p.name.endswith(".tmp")]
    m, r = compress(tiny_dir)  # same entry: read back whole, verified, and used
    assert r.cache["hit"] and r.cache["path"] == str(entries[0])
    m_ref, _ = compress(tiny_dir, cache=False)
    assert torch.equal(logits(m), logits(m_ref))


# -- CLI -------------------------------------------------------------------------------------------


def test_cli_decompose_writes_a_loadable_checkpoint(tiny_dir, tmp_path):
    from click.testing import CliRunner

    from lm_eval_lowrank.cli.checkpoint import decompose
    from lm_eval_lowrank.checkpoint import load_compressed

    out = tmp_path / "ck"
    r = CliRunner().invoke(decompose, ["--model_args", f"pretrained={tiny_dir},rank=4,layers=1|3,dtype=float32", "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    assert "saved" in r.output and "cache miss" in r.output
    m_ref, _ = compress(tiny_dir, cache=False)
    assert torch.equal(logits(load_compressed(out)), logits(m_ref))
    r2 = CliRunner().invoke(decompose, ["--model_args", f"pretrained={tiny_dir},rank=4,layers=1|3", "--out", str(out)])
    assert r2.exit_code != 0 and "not empty" in r2.output
    r3 = CliRunner().invoke(decompose, ["--model_args", f"pretrained={tiny_dir},rank=4,layers=1|3", "--out", str(out), "--overwrite", "--quiet"])
    assert r3.exit_code == 0 and "cache hit" in r3.output


def test_cli_decompose_refuses_a_taken_out_folder_before_decomposing(tiny_dir, tmp_path, monkeypatch):
    from click.testing import CliRunner

    import lm_eval_lowrank.api as api
    from lm_eval_lowrank.cli.checkpoint import decompose

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")

    def no_decomposition(*_a, **_k):
        raise AssertionError("decomposed before checking --out")

    monkeypatch.setattr(api, "compress_model", no_decomposition)
    r = CliRunner().invoke(decompose, ["--model_args", f"pretrained={tiny_dir},rank=4", "--out", str(taken), "--quiet"])
    assert r.exit_code == 2 and "exists and is not empty" in r.output, r.output
    r = CliRunner().invoke(decompose, ["--model_args", f"pretrained={tiny_dir},rank=4", "--out", str(taken), "--overwrite", "--quiet"])
    assert r.exit_code == 2 and "is not a compressed checkpoint; refusing to overwrite it" in r.output, r.output
    assert (taken / "notes.txt").read_text() == "mine"


def test_cli_decompose_rejects_unknown_model_args(tiny_dir, tmp_path):
    from click.testing import CliRunner

    from lm_eval_lowrank.cli.checkpoint import decompose

    r = subprocess.run(
        [str(BIN / "lm-eval-lowrank"), "decompose", "--model_args", f"pretrained={tiny_dir},rank=4,batch_size=2", "--out", str(tmp_path / "x")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode != 0
    assert "batch_size" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # A dtype torch does not have: one line before the weights load, not transformers' AttributeError.
    r = subprocess.run(
        [str(BIN / "lm-eval-lowrank"), "decompose", "--model_args", f"pretrained={tiny_dir},rank=4,dtype=float17", "--out", str(tmp_path / "x")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == ["Error: dtype='float17' is invalid: valid auto, float32, float16, bfloat16, float64 (or half, float, double)"]
    r = CliRunner().invoke(decompose, ["--model_args", f"pretrained={tiny_dir / 'missing'},rank=4", "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and str(r.exception).startswith(f"pretrained='{tiny_dir / 'missing'}' is invalid: no such local file or folder")


# -- end to end through lm_eval ----------------------------------------------------------------------


@pytest.mark.slow
def test_lm_eval_runs_hf_tucker_on_a_saved_checkpoint(saved, tmp_path):
    docs = tmp_path / "docs.jsonl"
    with docs.open("w") as f:
        for i in range(4):
            f.write(json.dumps({"q": f"the w{i} of", "choices": [f"w{i + 1}", "the", "and"], "label": i % 3}) + "\n")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tiny_mc.yaml").write_text(
        "task: tiny_mc\ndataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    test: {docs}\n"
        "output_type: multiple_choice\ntraining_split: null\ntest_split: test\n"
        'doc_to_text: "{{q}}"\ndoc_to_target: "{{label}}"\ndoc_to_choice: "{{choices}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run(
        [str(BIN / "lm_eval"), "--model", "hf-tucker", "--model_args", f"pretrained={saved[0]},dtype=float32",
         "--tasks", "tiny_mc", "--include_path", str(tasks), "--limit", "4", "--device", "cpu",
         "--batch_size", "2", "--output_path", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(sorted(out.rglob("results_*.json"))[-1].read_text())
    dec = res["config"]["lowrank"]["decomposition"]
    assert dec["loaded_from_checkpoint"] == str(saved[0])
    assert dec["modules"] == saved[2].plan.module_names()
    assert 0.0 <= res["results"]["tiny_mc"]["acc,none"] <= 1.0


def test_weight_sample_reads_the_same_bytes_raw_and_strided():
    # Host weights are sampled at their data pointer, others through a strided view: one fingerprint.
    from lm_eval_lowrank import checkpoint as ck

    for w in (torch.randn(300, 200), torch.randn(64, 48).to(torch.bfloat16), torch.randn(40, 70).mT):
        raw = ck._weight_sample(w)
        assert isinstance(raw, bytes) and len(raw) == ck.SAMPLE_RUNS * ck.SAMPLE_RUN * w.element_size()
        flat = (w if w.is_contiguous() else w.mT).reshape(-1)
        ends = torch.cat([flat[: ck.SAMPLE_RUN], flat[-ck.SAMPLE_RUN :]])
        assert raw == ends.view(torch.uint8).numpy().tobytes()
    sliced = torch.randn(50, 80)[:, ::2]  # neither layout in order: the strided path
    assert isinstance(ck._weight_sample(sliced), torch.Tensor)


def test_cache_key_follows_the_calibration_tokens_of_a_data_aware_method(tiny_dir, tmp_path, monkeypatch):
    """whiten's factors follow its calibration tokens: another data folder (or tokenizer) must miss the cache, not
    hand back the factors computed from the first one."""
    import json
    import random

    from transformers import AutoTokenizer

    from lm_eval_lowrank.api import compress_model

    def data_root(name: str, vocab: list[str]) -> Path:
        root = tmp_path / name
        (root / "gsm8k").mkdir(parents=True)
        rng = random.Random(0)
        with open(root / "gsm8k" / "train.jsonl", "w") as f:
            for _ in range(60):
                f.write(json.dumps({"question": " ".join(rng.choice(vocab) for _ in range(40)), "answer": " ".join(rng.choice(vocab) for _ in range(40))}) + "\n")
        return root

    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    spec = {"rank": 4, "layers": "1|3", "method": "whiten", "calib": "gsm8k_local", "calib_n": 8, "calib_len": 32}

    def run(root: Path, **extra):
        monkeypatch.setenv("LM_EVAL_LOWRANK_DATA", str(root))
        model = load_dense(tiny_dir)
        report = compress_model(model, {**spec, **extra}, tokenizer=tok, model_id=str(tiny_dir), progress=False)
        return model.model.layers[0].self_attn.q_proj.first.detach().clone(), report

    a, b = data_root("a", WORDS), data_root("b", WORDS[::-1][:12])
    fa, ra = run(a)
    fb, rb = run(b)
    fb_fresh, _ = run(b, cache=False)
    assert not ra.cache["hit"] and not rb.cache["hit"] and ra.cache["key"] != rb.cache["key"]
    assert torch.equal(fb, fb_fresh) and not torch.equal(fa, fb)
    fa_again, ra_again = run(a)  # the same tokens: a hit, with the same factors
    assert ra_again.cache["hit"] and ra_again.cache["key"] == ra.cache["key"] and torch.equal(fa_again, fa)


def test_an_out_folder_under_a_file_is_refused_before_any_work(tmp_path):
    from lm_eval_lowrank.checkpoint import CheckpointError, check_output_folder

    (tmp_path / "afile").write_text("x")
    with pytest.raises(CheckpointError, match=r"afile is a file; give a folder path"):
        check_output_folder(tmp_path / "afile" / "sub" / "ck")
    assert check_output_folder(tmp_path / "new" / "ck") == (tmp_path / "new" / "ck").resolve()


def test_overwriting_a_checkpoint_ignores_a_leftover_folder_of_a_killed_run(saved, tmp_path):
    import os

    from transformers import AutoTokenizer

    from lm_eval_lowrank.checkpoint import save_compressed

    ck = copy_ckpt(saved[0], tmp_path / "c")
    leftover = tmp_path / f".c.old-{os.getpid()}"  # the name the old code moved the checkpoint to
    (leftover / "x").mkdir(parents=True)
    from lm_eval_lowrank.checkpoint import load_compressed

    m = load_compressed(ck)
    save_compressed(m, ck, saved[2], tokenizer=AutoTokenizer.from_pretrained(str(ck)), overwrite=True)
    assert torch.equal(logits(load_compressed(ck)), saved[1])
    assert not any(p.name.startswith(".c.old-") and p != leftover for p in tmp_path.iterdir())


@pytest.mark.parametrize("new_is_complete", [True, False])
def test_ctrl_c_between_the_two_moves_of_an_overwrite_leaves_a_checkpoint(saved, tmp_path, monkeypatch, new_is_complete):
    """Ctrl-C after the old checkpoint moved aside and before the new one moved in left no checkpoint at --out and
    deleted the finished new one (the old one stayed in a hidden folder). The new one goes in; were it incomplete,
    the old one would go back. Nothing is left beside --out."""
    import os

    from transformers import AutoTokenizer

    import lm_eval_lowrank.checkpoint as C

    ck = copy_ckpt(saved[0], tmp_path / "c")
    (ck / "old.txt").write_text("the checkpoint before the overwrite")  # tells the two apart
    model = C.load_compressed(ck)
    replace = os.replace

    def interrupted(src, dst):
        replace(src, dst)
        if Path(src) == ck:  # the old one has just moved aside
            if not new_is_complete:  # as if the manifest had not been written
                next(p for p in tmp_path.iterdir() if p.name.endswith(".tmp")).joinpath(C.MANIFEST_NAME).unlink()
            raise KeyboardInterrupt

    monkeypatch.setattr(C.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        C.save_compressed(model, ck, saved[2], tokenizer=AutoTokenizer.from_pretrained(str(ck)), overwrite=True)
    monkeypatch.setattr(C.os, "replace", replace)
    assert (ck / "old.txt").exists() is not new_is_complete
    C.CompressedCheckpoint.open(ck).verify()
    assert torch.equal(logits(C.load_compressed(ck)), saved[1])
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "cache") == ["c"]  # cache: the private decomposition cache


def test_what_a_killed_save_left_is_cleared_and_an_old_checkpoint_moved_aside_comes_back(saved, tmp_path):
    """SIGKILL leaves a save's work folder (hundreds of MB, never reused) beside --out, or, between the two moves of
    an overwrite, the old checkpoint in a hidden folder with nothing at --out. The next save (or its early check)
    deletes the first and puts the second back; a folder a live save holds is left alone."""
    import os
    import shutil

    from lm_eval_lowrank import checkpoint as C

    ck = tmp_path / "c"
    stale_work = tmp_path / ".c.abc123.tmp"
    stale_work.mkdir()
    (stale_work / "lowrank_model.safetensors").write_bytes(b"x" * 1000)
    busy_work = tmp_path / ".c.busy.tmp"
    busy_work.mkdir()
    moved_aside = tmp_path / ".c.old-xyz"
    shutil.copytree(saved[0], moved_aside / "c")  # killed between the two moves: nothing at c
    fd = C._hold(busy_work)  # another save, still running
    try:
        assert C.check_output_folder(ck, overwrite=True) == ck.resolve()
        assert not stale_work.exists() and not moved_aside.exists() and busy_work.exists()
        C.CompressedCheckpoint.open(ck).verify()  # the old checkpoint is back
        assert torch.equal(logits(C.load_compressed(ck)), saved[1])
    finally:
        os.close(fd)
    C.check_output_folder(tmp_path / "other")  # its save ended: only the folders of c are c's to clear
    assert busy_work.exists()
    C.check_output_folder(ck, overwrite=True)
    assert not busy_work.exists()


def test_decompose_and_heal_refuse_a_bad_device_or_a_missing_subfolder_in_one_line(tiny_dir, tmp_path):
    from click.testing import CliRunner

    from lm_eval_lowrank.cli import cli
    from lm_eval_lowrank.spec import SpecError

    def decompose(extra: str):
        return CliRunner().invoke(cli, ["decompose", "--model_args", f"pretrained={tiny_dir},rank=4,{extra}", "--out", str(tmp_path / "x")])

    r = decompose("device=foo")
    assert isinstance(r.exception, SpecError) and str(r.exception) == "device='foo' is invalid: expected cpu, cuda or cuda:N"
    if not torch.cuda.is_available():
        r = decompose("device=cuda")
        assert isinstance(r.exception, SpecError) and "has no usable CUDA; use cpu" in str(r.exception)
    r = decompose("subfolder=nope")
    assert isinstance(r.exception, SpecError) and str(r.exception).startswith(f"pretrained='{tiny_dir}', subfolder='nope': no model config there (")
    assert "\n" not in str(r.exception) and not (tmp_path / "x").exists()
    r = decompose("rank=2")  # twice with the helper's rank=4; lm-eval's parser kept the last
    assert isinstance(r.exception, SpecError) and str(r.exception) == "model_args: rank is given twice (4 and 2); give it once"
    import transformers

    with pytest.MonkeyPatch.context() as mp:  # the windows a calibration needs, from the tokenizer alone
        mp.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("weights were loaded"))
        r = decompose("method=whiten,calib_n=100000,calib_len=16")
        assert isinstance(r.exception, SpecError) and str(r.exception).startswith("calib_n=100000 is invalid for calib='wikitext_local' at calib_len=16")
    r = CliRunner().invoke(cli, ["heal", str(tiny_dir), "--out", str(tmp_path / "h"), "--device", "foo"])
    assert r.exit_code == 2 and r.output.strip().splitlines() == ["Error: --device='foo' is invalid: expected cpu, cuda or cuda:N"]


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")  # peft reading a renamed transformers attribute
def test_cache_key_follows_a_peft_adapter_under_a_data_aware_method(tiny_dir, tmp_path, monkeypatch):
    """hf-tucker with peft=: the base weights and their files are the same under any adapter, but a data-aware
    method's activations pass through the adapters, so another adapter must miss the cache."""
    import json
    import random

    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from lm_eval_lowrank.api import compress_model

    root = tmp_path / "data"
    (root / "gsm8k").mkdir(parents=True)
    rng = random.Random(0)
    with open(root / "gsm8k" / "train.jsonl", "w") as f:
        for _ in range(60):
            f.write(json.dumps({"question": " ".join(rng.choice(WORDS) for _ in range(40)), "answer": "x"}) + "\n")
    monkeypatch.setenv("LM_EVAL_LOWRANK_DATA", str(root))
    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    spec = {"rank": 4, "layers": "3", "tensors": "q|gate", "method": "whiten", "calib": "gsm8k_local", "calib_n": 8, "calib_len": 32}

    def run(seed: int, **extra):
        torch.manual_seed(seed)  # the adapter's weights (layers 1-3's o_proj and down_proj feed layer 3's inputs)
        lora = LoraConfig(r=4, target_modules=["o_proj", "down_proj"], init_lora_weights=False)
        peft_model = get_peft_model(load_dense(tiny_dir), lora).eval()  # what HFLM holds with peft=
        model = peft_model.get_base_model()
        report = compress_model(peft_model, {**spec, **extra}, tokenizer=tok, model_id=str(tiny_dir), progress=False)
        return model.model.layers[2].self_attn.q_proj.first.detach().clone(), report

    fa, ra = run(1)
    fb, rb = run(2)
    fb_fresh, _ = run(2, cache=False)
    assert not rb.cache["hit"] and rb.cache["key"] != ra.cache["key"]
    assert torch.equal(fb, fb_fresh) and not torch.equal(fa, fb)
    fa_again, ra_again = run(1)  # the same adapter: a hit
    assert ra_again.cache["hit"] and torch.equal(fa_again, fa)


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")
def test_statistics_fingerprint_follows_a_small_peft_adapter(tiny_llama):
    """The statistics cache samples every 7th weight, which can skip a one-module adapter: every adapter weight counts."""
    import copy

    from peft import LoraConfig, get_peft_model

    from lm_eval_lowrank.calibration import model_fingerprint, peft_adapter_digest

    def adapted(seed: int):
        torch.manual_seed(seed)
        lora = LoraConfig(r=2, target_modules=["o_proj"], layers_to_transform=[0], init_lora_weights=False)
        return get_peft_model(copy.deepcopy(tiny_llama), lora).get_base_model()

    a, b = adapted(1), adapted(2)
    assert peft_adapter_digest(tiny_llama) is None and peft_adapter_digest(a) != peft_adapter_digest(b)
    assert model_fingerprint(a, "m") != model_fingerprint(b, "m")
    assert model_fingerprint(a, "m") == model_fingerprint(adapted(1), "m")


def test_subfolder_weights_are_cached_by_the_subfolders_files(tmp_path):
    """subfolder=: the weights are read from pretrained/subfolder, so the cache keys on that folder's files (it was
    disabled, "source files not found locally", when the parent held no weights)."""
    from lm_eval_lowrank.harness import HFTuckerLM

    make_tiny_dir(tmp_path / "repo" / "sub")
    args = dict(pretrained=str(tmp_path / "repo"), subfolder="sub", rank=2, layers="2", device="cpu", batch_size=1)
    first = HFTuckerLM(**args)._lowrank_report["cache"]
    second = HFTuckerLM(**args)._lowrank_report["cache"]
    assert first["enabled"] and not first["hit"] and second["hit"] and second["key"] == first["key"]


def test_a_hub_id_with_a_subfolder_resolves_to_that_folder_of_the_snapshot(tmp_path, monkeypatch):
    import huggingface_hub

    from lm_eval_lowrank.checkpoint import _resolve_local_folder

    (tmp_path / "snap" / "a" / "b").mkdir(parents=True)
    asked = []

    def snapshot_download(repo, revision=None, local_files_only=False):
        asked.append(repo)
        return str(tmp_path / "snap")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert _resolve_local_folder("org/name/a/b", None) == tmp_path / "snap" / "a" / "b"
    assert _resolve_local_folder("org/name", None) == tmp_path / "snap"
    assert _resolve_local_folder("gpt2", None) == tmp_path / "snap"
    assert _resolve_local_folder("org/name/missing", None) is None
    assert asked == ["org/name", "org/name", "gpt2", "org/name"]


def test_decompose_with_a_subfolder_ships_its_tokenizer_and_records_it_as_the_source(tmp_path):
    """decompose read the weights from pretrained/subfolder but the tokenizer from pretrained (HFLM reads both from
    the subfolder), and recorded the parent's files as the source, so heal --teacher dense distilled from the
    parent's model and its sha256 guard compared the parent with itself."""
    import json

    from click.testing import CliRunner
    from transformers import AutoTokenizer, LlamaForCausalLM

    from lm_eval_lowrank.checkpoint import CompressedCheckpoint, source_digest
    from lm_eval_lowrank.cli import cli
    from lm_eval_lowrank.heal import load_teacher, resolve_teacher

    root = tmp_path / "repo"
    torch.manual_seed(1)
    LlamaForCausalLM(tiny_llama_config(hidden_size=32, intermediate_size=64)).save_pretrained(root)  # another model
    tok = tiny_tokenizer()
    tok.add_tokens(["extra"])  # and another tokenizer at the root
    tok.save_pretrained(root)
    make_tiny_dir(root / "sub")
    out = tmp_path / "ck"
    r = CliRunner().invoke(cli, ["decompose", "--model_args", f"pretrained={root},subfolder=sub,rank=4,layers=1", "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    assert len(AutoTokenizer.from_pretrained(str(out))) == len(tiny_tokenizer()) != len(tok)
    source = json.loads((out / "lowrank_manifest.json").read_text())["source"]
    assert source["model_id"] == str(root) and source["subfolder"] == "sub"
    assert source["weights_sha256"] == source_digest(root / "sub") != source_digest(root)
    info = resolve_teacher("dense", CompressedCheckpoint.open(out))
    assert info["subfolder"] == "sub" and info["weights_sha256"] == source["weights_sha256"]
    assert load_teacher(info, "cpu").config.hidden_size == load_dense(root / "sub").config.hidden_size != 32


def _damage_cache_report(entry: Path) -> None:
    """One byte of the stored report (inside the safetensors header's metadata) changed; the tensors intact."""
    data = bytearray(entry.read_bytes())
    n = int.from_bytes(data[:8], "little")
    i = data[8 : 8 + n].decode().index('\\"solvers\\"')
    data[8 + i + len('\\"solvers\\"')] = ord("#")  # the colon after the key: the header stays JSON, the report not
    entry.write_bytes(bytes(data))


def test_a_cache_entry_with_a_damaged_report_is_recomputed_and_the_model_left_whole(tiny_dir):
    """The entry's sha256 covered the tensors only: a damaged report crashed the run (JSONDecodeError) after every
    module had been swapped for the cached factors."""
    from lm_eval_lowrank.api import compress_model

    model = load_dense(tiny_dir)
    first = compress_model(model, SPEC, model_id=str(tiny_dir), progress=False)
    expected = logits(model)
    _damage_cache_report(Path(first.cache["path"]))
    again = load_dense(tiny_dir)
    with pytest.warns(UserWarning, match="its report's sha256 does not match: the file is corrupted\\); recomputing it"):
        report = compress_model(again, SPEC, model_id=str(tiny_dir), progress=False)
    assert not report.cache["hit"] and torch.equal(logits(again), expected)


def test_an_unusable_cache_folder_turns_the_cache_off_with_a_warning(tiny_dir, tmp_path, monkeypatch):
    """A cache root that cannot be created (a read-only home, a file in the way) raised a raw OSError after the
    weights had loaded; the caches are an optimisation, so the run goes on without them."""
    from lm_eval_lowrank.api import compress_model

    (tmp_path / "afile").write_text("")
    monkeypatch.setenv("LM_EVAL_LOWRANK_CACHE", str(tmp_path / "afile" / "cache"))
    model = load_dense(tiny_dir)
    with pytest.warns(UserWarning, match=r"the cache folder cannot be used \(.*Not a directory.*\); running without the decomp cache"):
        report = compress_model(model, SPEC, model_id=str(tiny_dir), progress=False)
    assert report.cache == {"enabled": False, "hit": False, "key": None, "path": None, "reason": "the cache folder cannot be used"}
    assert len(report.plan.targets) == 14


def test_a_saved_checkpoint_is_as_readable_as_the_umask_allows(tiny_dir, tmp_path):
    """mkstemp/mkdtemp made the folder 0700 and the weights and manifest 0600: a shared checkpoint could not be
    read by anyone else, while config.json beside them was 0644."""
    import os
    import stat

    from lm_eval_lowrank.api import compress_model
    from lm_eval_lowrank.checkpoint import save_compressed

    model = load_dense(tiny_dir)
    report = compress_model(model, {**SPEC, "cache": False}, progress=False)
    old = os.umask(0o022)
    try:
        out = save_compressed(model, tmp_path / "shared", report)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes["lowrank_model.safetensors"] == modes["lowrank_manifest.json"] == modes["config.json"] == 0o644


@pytest.mark.parametrize(
    "field,edit,says",
    [
        ("format_version", lambda m: m.update(format_version="2.0"), "has format_version '2.0', not a whole number >= 1"),
        ("format_version", lambda m: m.update(format_version=None), "has format_version None, not a whole number >= 1"),
        ("rank", lambda m: next(iter(m["modules"].values())).update(rank="4x"), "].rank is '4x', not a whole number >= 1"),
        ("in_features", lambda m: next(iter(m["modules"].values())).pop("in_features"), "].in_features is None, not a whole number >= 1"),
        ("layout", lambda m: next(iter(m["modules"].values())).update(layout="bogus"), "].layout is 'bogus', valid folded, tucker"),
        ("weights", lambda m: m["weights"].update({"lowrank_model.safetensors": "x"}), "weights['lowrank_model.safetensors'] is not an object"),
        ("tied", lambda m: m.update(tied=["a"]), "'tied' is not an object"),
    ],
)
def test_an_edited_manifest_is_a_one_line_checkpoint_error(field, edit, says, tiny_dir, tmp_path):
    """ValueError, TypeError, KeyError or AttributeError tracebacks, where load_compressed promises CheckpointError
    (which hf-tucker prints as one line)."""
    import json

    from lm_eval_lowrank.api import compress_model
    from lm_eval_lowrank.checkpoint import CheckpointError, load_compressed, save_compressed

    model = load_dense(tiny_dir)
    out = save_compressed(model, tmp_path / "c", compress_model(model, {**SPEC, "cache": False}, progress=False))
    manifest = json.loads((out / "lowrank_manifest.json").read_text())
    edit(manifest)
    (out / "lowrank_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError) as err:
        load_compressed(out)
    assert says in str(err.value) and "\n" not in str(err.value) and str(err.value).endswith("the checkpoint is damaged")


def test_a_checkpoint_loaded_in_bf16_keeps_the_modules_transformers_keeps_in_fp32(tmp_path):
    """DeepSeek-V3 keeps its router's e_score_correction_bias in fp32 under dtype=bfloat16
    (_keep_in_fp32_modules_strict); load_compressed(dtype=bfloat16) cast it, so the checkpoint routed tokens
    otherwise than the decompose-on-load run it was saved from."""
    from transformers import AutoModelForCausalLM, DeepseekV3Config

    from lm_eval_lowrank.api import compress_model
    from lm_eval_lowrank.checkpoint import load_compressed, save_compressed

    cfg = DeepseekV3Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1,
        first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
        max_position_embeddings=128,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # router scores all alike, so the bias, 1.000 .. 1.007, picks the experts (a bf16 step is 0.0078)
        for mod in model.modules():
            if hasattr(mod, "e_score_correction_bias"):
                mod.weight.zero_()
                mod.e_score_correction_bias.copy_(1.0 + 0.001 * torch.arange(mod.e_score_correction_bias.numel()))
    model.save_pretrained(tmp_path / "src")

    def router_bias_dtypes(m):
        return {t.dtype for n, t in [*m.named_parameters(), *m.named_buffers()] if "e_score_correction_bias" in n}

    dense = AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.bfloat16)
    assert router_bias_dtypes(dense) == {torch.float32}
    report = compress_model(dense, {"rank": 4, "layers": "1", "tensors": "q_proj|o_proj", "cache": False}, progress=False)
    out = save_compressed(dense, tmp_path / "c", report)
    loaded = load_compressed(out, dtype="bfloat16", device="cpu")
    assert router_bias_dtypes(loaded) == {torch.float32}
    assert torch.equal(logits(loaded), logits(dense))


def test_an_argument_that_changes_nothing_does_not_miss_the_cache(tiny_dir):
    """solver_tol under solver=exact (or calib_target under rom) changed the cache key though the factors were
    the same: each value recomputed and stored its own entry."""
    _, exact = compress(tiny_dir, solver="exact")
    _, loose = compress(tiny_dir, solver="exact", solver_tol=0.05)
    assert loose.cache["hit"] and loose.cache["key"] == exact.cache["key"]
    assert loose.to_dict()["spec"]["solver_tol"] == 0.05  # still recorded as given (and warned about)
    _, krylov = compress(tiny_dir, solver="krylov", solver_tol=0.05)
    assert not krylov.cache["hit"] and krylov.cache["key"] != exact.cache["key"]
