"""Healing fine-tune: a few steps of factor training lower the loss and save a loadable checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from test_checkpoint import SPEC, WORDS, load_dense, make_tiny_dir

# Repetitive text the tiny model can fit within a few steps.
TEXT = " ".join(WORDS[i % 7] + " " + WORDS[(i * 3) % 11] for i in range(3000))


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_tiny_dir(tmp_path_factory.mktemp("heal_src"))


@pytest.fixture(scope="module")
def ckpt(src, tmp_path_factory):
    from transformers import AutoTokenizer

    from lm_eval_lowrank.api import compress_model
    from lm_eval_lowrank.checkpoint import save_compressed

    model = load_dense(src)
    report = compress_model(model, {**SPEC, "cache": False}, progress=False)
    out = tmp_path_factory.mktemp("heal_ckpt") / "c"
    save_compressed(model, out, report, tokenizer=AutoTokenizer.from_pretrained(str(src)), source={"model_id": str(src)})
    return out


def test_a_few_heal_steps_lower_the_loss_and_touch_only_factors(ckpt):
    from transformers import AutoTokenizer

    from lm_eval_lowrank.checkpoint import load_compressed
    from lm_eval_lowrank.heal import heal_model

    model = load_compressed(ckpt)
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not n.endswith((".first", ".last", ".core"))}
    rec = heal_model(model, tok, [TEXT], steps=12, lr=3e-3, seq_len=32, batch_size=4, progress=False)
    assert rec["loss_after"] < rec["loss_before"] - 0.05
    assert rec["train_loss_last"] < rec["train_loss_first"]
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_heal_checkpoint_saves_a_checkpoint_hf_tucker_loads(ckpt, tmp_path):
    from lm_eval_lowrank.checkpoint import MANIFEST_NAME, load_compressed
    from lm_eval_lowrank.harness import HFTuckerLM

    data = tmp_path / "train.txt"
    data.write_text(TEXT)
    held = tmp_path / "held.txt"
    held.write_text(" ".join(WORDS[(i * 5) % 7] for i in range(2000)))
    out = tmp_path / "healed"
    from click.testing import CliRunner

    from lm_eval_lowrank.cli.checkpoint import heal

    r = CliRunner().invoke(heal, [str(ckpt), "--out", str(out), "--data", str(data), "--steps", "8", "--lr", "3e-3", "--seq_len", "32", "--eval_data", str(held), "--eval_blocks", "4", "--device", "cpu", "--quiet"])
    assert r.exit_code == 0, r.output
    m = json.loads((out / MANIFEST_NAME).read_text())
    rec = m["healing"][-1]
    assert rec["steps"] == 8 and rec["lr"] == 3e-3 and rec["data"] == str(data) and rec["data_split"] == "train"
    assert rec["loss_after"] < rec["loss_before"]
    assert rec["eval_ppl_before"] > 0 and rec["eval_ppl_after"] > 0
    assert m["ranks"] == json.loads((ckpt / MANIFEST_NAME).read_text())["ranks"]
    healed = load_compressed(out)
    lm = HFTuckerLM(pretrained=str(out), device="cpu", dtype="float32")
    x = torch.randint(3, 100, (1, 10))
    with torch.no_grad():
        assert torch.equal(lm.model(x).logits, healed(x).logits)
        assert not torch.equal(healed(x).logits, load_compressed(ckpt)(x).logits)
    assert lm.lowrank_info()["decomposition"]["checkpoint"]["healing"][-1]["steps"] == 8


def test_heal_errors_name_the_argument(ckpt, tmp_path):
    from click.testing import CliRunner

    from lm_eval_lowrank.cli.checkpoint import heal

    r = CliRunner().invoke(heal, [str(ckpt), "--out", str(tmp_path / "o"), "--data", str(tmp_path / "missing.txt"), "--steps", "1"])
    assert r.exit_code == 2 and "--data" in r.output and "does not exist" in r.output
    r = CliRunner().invoke(heal, [str(tmp_path), "--out", str(tmp_path / "o"), "--steps", "1"])
    assert r.exit_code == 2 and "not a compressed checkpoint" in r.output


def test_heal_refuses_a_taken_out_folder_before_training(ckpt, tmp_path, monkeypatch):
    from click.testing import CliRunner

    import lm_eval_lowrank.heal as heal_module
    from lm_eval_lowrank.cli.checkpoint import heal

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")

    def no_training(*_a, **_k):
        raise AssertionError("trained before checking --out")

    monkeypatch.setattr(heal_module, "read_texts", no_training)  # the first step after the argument checks
    r = CliRunner().invoke(heal, [str(ckpt), "--out", str(taken), "--steps", "1"])
    assert r.exit_code == 2 and "exists and is not empty" in r.output, r.output
    assert (taken / "notes.txt").read_text() == "mine"


# -- distillation -------------------------------------------------------------------------

HELD_TEXT = " ".join(WORDS[(i * 5) % 13] for i in range(600))


def _one_line_error(r, *needles: str) -> None:
    assert r.exit_code != 0, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), r.output
    for n in needles:
        assert n in lines[0], (n, r.output)


def test_kd_healing_lowers_the_kl_to_the_teacher_on_held_out_blocks(ckpt, src):
    from transformers import AutoTokenizer

    from lm_eval_lowrank.checkpoint import load_compressed
    from lm_eval_lowrank.heal import heal_model, mean_kl, token_blocks

    model = load_compressed(ckpt)
    teacher = load_dense(src)
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not n.endswith((".first", ".last", ".core"))}
    unseen = token_blocks(tok, [HELD_TEXT], 32, max_blocks=4)  # text the training never sees
    kl_unseen = mean_kl(model, teacher, unseen)
    rec = heal_model(model, tok, [TEXT], steps=12, lr=3e-3, seq_len=32, batch_size=4, progress=False, teacher=teacher, temperature=2.0)
    assert rec["objective"] == "kd" and rec["kd_weight"] == 1.0 and rec["temperature"] == 2.0
    assert rec["kl_after"] < 0.8 * rec["kl_before"]
    assert mean_kl(model, teacher, unseen) < kl_unseen
    assert all(not p.requires_grad for p in teacher.parameters()) and not teacher.training
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n


def test_a_teacher_identical_to_the_student_gives_zero_kd_loss(ckpt):
    import copy

    from transformers import AutoTokenizer

    from lm_eval_lowrank.checkpoint import load_compressed
    from lm_eval_lowrank.heal import heal_model, kd_loss

    model = load_compressed(ckpt)
    teacher = copy.deepcopy(model)
    x = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in (1.0, 3.0):
            assert abs(float(kd_loss(model(x).logits, teacher(x).logits, t))) < 1e-6
    # Zero loss and zero gradient: there is nothing to distil.
    params = [p for n, p in model.named_parameters() if n.endswith((".first", ".last", ".core"))]
    for p in params:
        p.requires_grad_(True)
    with torch.no_grad():
        t_logits = teacher(x).logits
    kd_loss(model(x).logits, t_logits, 2.0).backward()
    assert max(float(p.grad.abs().max()) for p in params) < 1e-6
    for p in params:
        p.grad = None
        p.requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    rec = heal_model(model, tok, [TEXT], steps=1, lr=1e-3, seq_len=32, batch_size=2, progress=False, teacher=teacher)
    assert abs(rec["kl_before"]) < 1e-6 and abs(rec["train_kd_first"]) < 1e-6


def test_kd_loss_is_the_temperature_scaled_kl():
    from lm_eval_lowrank.heal import kd_loss

    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 3, 7, generator=g), torch.randn(2, 3, 7, generator=g)
    T = 2.0
    ps, pt = torch.softmax(s / T, -1), torch.softmax(t / T, -1)
    want = (pt * (pt.log() - ps.log())).sum(-1).mean() * T * T
    assert torch.allclose(kd_loss(s, t, T), want, atol=1e-6)


def test_heal_cli_distils_from_the_dense_source_on_mixed_data(ckpt, src, tmp_path):
    from click.testing import CliRunner

    from lm_eval_lowrank.checkpoint import MANIFEST_NAME
    from lm_eval_lowrank.cli.checkpoint import heal

    a, b = tmp_path / "a.txt", tmp_path / "b.jsonl"
    a.write_text(TEXT)
    b.write_text("\n".join(json.dumps({"question": " ".join(WORDS[(i + j) % 11] for j in range(20)), "choices": {"text": ["the a", "of and"], "label": ["A", "B"]}, "answerKey": "B"}) for i in range(60)))
    out = tmp_path / "kd"
    args = [str(ckpt), "--out", str(out), "--data", str(a), "--data", str(b), "--steps", "6", "--lr", "3e-3", "--seq_len", "32", "--batch_size", "2"]
    r = CliRunner().invoke(heal, args + ["--teacher", "dense", "--kd_weight", "0.5", "--temperature", "2", "--device", "cpu", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "kl_before" in r.output
    rec = json.loads((out / MANIFEST_NAME).read_text())["healing"][-1]
    assert rec["objective"] == "kd+lm" and rec["kd_weight"] == 0.5 and rec["temperature"] == 2.0
    assert rec["teacher"]["spec"] == "dense" and rec["teacher"]["model_id"] == str(src.resolve()) and not rec["teacher"]["compressed"]
    assert rec["data"] == [str(a), str(b)] and rec["data_split"] == ["a", "b"]
    assert [(m["source"], m["train_blocks"]) for m in rec["data_mix"]] == [(str(a), 6), (str(b), 6)]  # mixed evenly: 6 steps x 2 blocks
    assert rec["kl_before"] > 0 and rec["kl_after"] >= 0  # the decrease is checked in the heal_model test


def test_mc_records_become_question_and_answer_text(tmp_path):
    from lm_eval_lowrank.heal import read_texts

    f = tmp_path / "mc.jsonl"
    rows = [
        {"id": "x", "question": "Which is hot?", "choices": {"text": ["ice", "fire"], "label": ["1", "2"]}, "answerKey": "2"},
        {"question": "2+2?", "subject": "math", "choices": ["3", "4"], "answer": 1},
    ]
    f.write_text("\n".join(json.dumps(r) for r in rows))
    assert read_texts(f) == ["Question: Which is hot?\nAnswer: fire", "Question: 2+2?\nAnswer: 4"]


def test_kd_errors_are_one_line_and_come_before_the_weights_load(ckpt, tmp_path, monkeypatch):
    from click.testing import CliRunner
    from transformers import LlamaConfig

    from lm_eval_lowrank.checkpoint import CompressedCheckpoint
    from lm_eval_lowrank.cli.checkpoint import heal

    def no_load(*a, **k):
        raise AssertionError("weights loaded before the argument check")

    monkeypatch.setattr(CompressedCheckpoint, "load_model", no_load)
    data = tmp_path / "t.txt"
    data.write_text(TEXT)
    other = tmp_path / "other_vocab"
    LlamaConfig(vocab_size=77, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(other)
    base = [str(ckpt), "--out", str(tmp_path / "o"), "--data", str(data), "--steps", "2"]
    run = lambda *extra: CliRunner().invoke(heal, base + list(extra))  # noqa: E731
    _one_line_error(run("--kd_weight", "0.5"), "--kd_weight", "needs --teacher")
    _one_line_error(run("--temperature", "2"), "--temperature", "needs --teacher")
    _one_line_error(run("--teacher", "dense", "--kd_weight", "1.5"), "--kd_weight 1.5", "[0, 1]")
    _one_line_error(run("--teacher", "dense", "--temperature", "0"), "--temperature", "positive")
    _one_line_error(run("--teacher", str(tmp_path / "missing")), "--teacher", "'dense'")
    _one_line_error(run("--teacher", "no-such-model-xyz"), "--teacher no-such-model-xyz", "'dense'")
    _one_line_error(run("--teacher", str(other)), "--teacher", "vocabulary of 77")
    _one_line_error(run("--data", str(data)), "--data", "twice")


def test_teacher_dense_needs_the_recorded_source(ckpt, src, tmp_path):
    import shutil

    from lm_eval_lowrank.checkpoint import MANIFEST_NAME, CompressedCheckpoint
    from lm_eval_lowrank.heal import HealError, resolve_teacher

    c = tmp_path / "c"
    shutil.copytree(ckpt, c)
    m = json.loads((c / MANIFEST_NAME).read_text())
    m["source"] = None
    (c / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(HealError, match="--teacher dense: the checkpoint records no source model"):
        resolve_teacher("dense", CompressedCheckpoint.open(c))
    m["source"] = {"model_id": str(src), "weights_sha256": "0" * 64}  # not the weights at src now
    (c / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(HealError, match="--teacher dense: the weights at .* differ"):
        resolve_teacher("dense", CompressedCheckpoint.open(c))
    assert resolve_teacher(str(src), CompressedCheckpoint.open(c))["weights_sha256"]  # explicit path: allowed


def test_training_on_a_scored_split_is_flagged(ckpt, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from lm_eval_lowrank.checkpoint import MANIFEST_NAME
    from lm_eval_lowrank.cli.checkpoint import heal
    from lm_eval_lowrank.tasks import DATA_ENV

    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    (tmp_path / "arc_easy").mkdir()
    row = {"question": " ".join(WORDS[:12]), "choices": {"text": ["the a", "of and"], "label": ["A", "B"]}, "answerKey": "A"}
    for split in ("test", "validation"):
        (tmp_path / "arc_easy" / f"{split}.jsonl").write_text("\n".join(json.dumps(row) for _ in range(40)))
    base = [str(ckpt), "--steps", "1", "--seq_len", "16", "--batch_size", "1", "--device", "cpu", "--quiet"]
    r = CliRunner().invoke(heal, base + ["--out", str(tmp_path / "v"), "--data", str(tmp_path / "arc_easy" / "validation.jsonl")])
    assert r.exit_code == 0 and "warning" not in r.output, r.output
    assert json.loads((tmp_path / "v" / MANIFEST_NAME).read_text())["healing"][-1]["scored_by"] == {}
    test_file = tmp_path / "arc_easy" / "test.jsonl"
    r = CliRunner().invoke(heal, base + ["--out", str(tmp_path / "t"), "--data", str(test_file)])
    assert r.exit_code == 0 and "arc_easy_local scores" in r.output, r.output
    assert json.loads((tmp_path / "t" / MANIFEST_NAME).read_text())["healing"][-1]["scored_by"] == {str(test_file): ["arc_easy_local"]}


# -- fixes: saved dtypes, early and one-line errors, even mixing, state on failure -----------------


def _no_load(monkeypatch) -> None:
    """Make any weight load fail the test: the checks under test must come first."""
    from lm_eval_lowrank.checkpoint import CompressedCheckpoint

    def no_load(*a, **k):
        raise AssertionError("weights loaded before the argument check")

    monkeypatch.setattr(CompressedCheckpoint, "load_model", no_load)


def _low_precision_ckpt(src, out, keep_fp32_norm: bool = False):
    """A bf16 checkpoint of the tiny model; with ``keep_fp32_norm`` its final norm stays fp32 (mixed dtypes)."""
    from transformers import AutoTokenizer

    from lm_eval_lowrank.api import compress_model
    from lm_eval_lowrank.checkpoint import save_compressed

    model = load_dense(src).to(torch.bfloat16)
    if keep_fp32_norm:
        model.model.norm.float()  # as _keep_in_fp32_modules leaves a module
    report = compress_model(model, {**SPEC, "cache": False}, progress=False)
    save_compressed(model, out, report, tokenizer=AutoTokenizer.from_pretrained(str(src)), source={"model_id": str(src)})
    return out


def _stored_dtypes(path) -> dict[str, str]:
    from safetensors import safe_open

    from lm_eval_lowrank.checkpoint import WEIGHTS_NAME

    with safe_open(str(path / WEIGHTS_NAME), "pt") as f:
        return {k: str(f.get_slice(k).get_dtype()) for k in f.keys()}


@pytest.mark.parametrize("keep_fp32_norm", [False, True], ids=["bf16", "bf16+fp32"])
def test_after_numbers_describe_the_saved_checkpoint_in_its_stored_dtypes(src, tmp_path, keep_fp32_norm):
    from transformers import AutoTokenizer

    from lm_eval_lowrank.checkpoint import CompressedCheckpoint, load_compressed
    from lm_eval_lowrank.heal import heal_checkpoint, mean_loss, mixed_blocks, perplexity, read_texts, token_blocks

    ckpt_in = _low_precision_ckpt(src, tmp_path / "in", keep_fp32_norm)
    data, held = tmp_path / "train.txt", tmp_path / "held.txt"
    data.write_text(TEXT)
    held.write_text(HELD_TEXT)
    out = tmp_path / "out"
    # A small lr: the fp32 update is then mostly lost to bf16 rounding, which the old record ignored.
    rec = heal_checkpoint(ckpt_in, out, data=str(data), steps=4, lr=2e-5, seq_len=32, batch_size=4, device="cpu", eval_data=str(held), eval_blocks=8, progress=False)
    c_in, c_out = CompressedCheckpoint.open(ckpt_in), CompressedCheckpoint.open(out)
    assert c_out.manifest["dtype"] == c_in.manifest["dtype"] and c_out.weight_bytes() == c_in.weight_bytes()
    assert _stored_dtypes(out) == _stored_dtypes(ckpt_in)
    # The record's "after" numbers recomputed on the saved checkpoint (exact fp32 upcast), with the same blocks.
    tok = AutoTokenizer.from_pretrained(str(out))
    saved = load_compressed(out, dtype=torch.float32)
    held_blocks = mixed_blocks(tok, [[TEXT]], 32, 4 * 4, 8)[0]
    eval_blocks = token_blocks(tok, read_texts(held), 32, max_blocks=8)
    assert rec["loss_after"] == pytest.approx(mean_loss(saved, held_blocks, 4), rel=1e-6)
    assert rec["eval_ppl_after"] == pytest.approx(perplexity(saved, eval_blocks, 4), rel=1e-6)
    assert rec["loss_before"] == pytest.approx(mean_loss(load_compressed(ckpt_in, dtype=torch.float32), held_blocks, 4), rel=1e-6)


def test_heal_model_rounds_the_trained_factors_to_round_to(ckpt):
    from transformers import AutoTokenizer

    from lm_eval_lowrank.checkpoint import load_compressed
    from lm_eval_lowrank.heal import heal_model

    model = load_compressed(ckpt, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    heal_model(model, tok, [TEXT], steps=2, lr=1e-3, seq_len=32, batch_size=2, progress=False, round_to=torch.bfloat16)
    for n, p in model.named_parameters():
        if n.endswith((".first", ".last", ".core")):
            assert p.dtype == torch.float32 and torch.equal(p, p.to(torch.bfloat16).float()), n


def test_lr_must_be_positive_and_finite(ckpt, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from lm_eval_lowrank.cli.checkpoint import heal
    from lm_eval_lowrank.heal import HealError, check_heal_args

    for bad in (float("inf"), float("nan"), 0.0, -1e-3):
        with pytest.raises(HealError, match="--lr .* expected a positive finite float"):
            check_heal_args(lr=bad)
    _no_load(monkeypatch)
    data = tmp_path / "t.txt"
    data.write_text(TEXT)
    for bad in ("inf", "nan"):
        r = CliRunner().invoke(heal, [str(ckpt), "--out", str(tmp_path / "o"), "--data", str(data), "--lr", bad])
        _one_line_error(r, f"--lr {bad}", "finite")


def test_data_errors_name_the_argument_and_file_before_the_weights_load(ckpt, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from lm_eval_lowrank.cli.checkpoint import heal

    _no_load(monkeypatch)
    data, short = tmp_path / "train.txt", tmp_path / "short.txt"
    data.write_text(TEXT)
    short.write_text("the a of")  # fewer tokens than one block
    base = [str(ckpt), "--out", str(tmp_path / "o"), "--steps", "2", "--seq_len", "16", "--device", "cpu"]
    run = lambda *extra: CliRunner().invoke(heal, base + list(extra))  # noqa: E731
    _one_line_error(run("--data", str(data), "--eval_data", str(tmp_path / "nope.txt")), "--eval_data", "nope.txt", "does not exist")
    _one_line_error(run("--data", str(data), "--eval_data", str(short)), "--eval_data", "short.txt", "--seq_len 16")
    _one_line_error(run("--data", str(short)), "--data", "short.txt", "--seq_len 16")
    # Enough for the held-out blocks' share of one source but not the other's: named by file.
    small = tmp_path / "small.txt"
    small.write_text(" ".join(WORDS[i % 5] for i in range(40)))  # 2 blocks of 16; the held-out share is 4
    _one_line_error(run("--data", str(data), "--data", str(small)), "--data", "small.txt", "held out")


def test_unreadable_text_is_a_one_line_error_with_file_and_line(ckpt, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from lm_eval_lowrank.cli.checkpoint import heal
    from lm_eval_lowrank.heal import HealError, read_texts

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "the a of"}\n{"text": "oops\n')
    broken = tmp_path / "broken.json"
    broken.write_text('[{"text": "the a"},\n {"text": ]')
    latin = tmp_path / "latin.txt"
    latin.write_bytes("the a of\ncaf\xe9".encode("latin-1"))
    with pytest.raises(HealError, match=r"^--data .*bad\.jsonl line 2: not valid JSON"):
        read_texts(bad)
    with pytest.raises(HealError, match=r"^--data .*broken\.json line 2: not valid JSON"):
        read_texts(broken)
    with pytest.raises(HealError, match=r"^--eval_data .*latin\.txt line 2: not UTF-8"):
        read_texts(latin, "--eval_data")
    _no_load(monkeypatch)
    data = tmp_path / "t.txt"
    data.write_text(TEXT)
    r = CliRunner().invoke(heal, [str(ckpt), "--out", str(tmp_path / "o"), "--data", str(data), "--eval_data", str(bad)])
    _one_line_error(r, "--eval_data", "bad.jsonl line 2")


def test_seq_len_beyond_learned_positions_is_refused_before_the_load(tmp_path, monkeypatch, capsys):
    from click.testing import CliRunner
    from transformers import GPT2Config, GPT2LMHeadModel

    from lm_eval_lowrank.api import compress_model
    from lm_eval_lowrank.checkpoint import save_compressed
    from lm_eval_lowrank.cli.checkpoint import heal

    from test_checkpoint import tiny_tokenizer

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=128, bos_token_id=1, eos_token_id=2)
    model = GPT2LMHeadModel(cfg)
    tok = tiny_tokenizer()
    report = compress_model(model, {"rank": 4, "layers": "1|2", "cache": False}, progress=False)
    gpt2 = save_compressed(model, tmp_path / "gpt2", report, tokenizer=tok, source={"model_id": "tiny-gpt2"})
    _no_load(monkeypatch)
    data = tmp_path / "t.txt"
    data.write_text(TEXT)
    r = CliRunner().invoke(heal, [str(gpt2), "--out", str(tmp_path / "o"), "--data", str(data), "--seq_len", str(cfg.n_positions + 1)])
    _one_line_error(r, f"--seq_len {cfg.n_positions + 1}", f"2..{cfg.n_positions}", "n_positions")
    from conftest import tiny_llama_config
    from lm_eval_lowrank.heal import check_seq_len

    check_seq_len(cfg.n_positions, cfg)  # the last position is fine
    # Rotary positions run past max_position_embeddings: a warning, not an error.
    llama = tiny_llama_config()
    check_seq_len(llama.max_position_embeddings * 2, llama)
    assert "max_position_embeddings" in capsys.readouterr().err


def test_sources_share_the_training_blocks_and_the_record_says_what_trained(ckpt):
    import collections

    from transformers import AutoTokenizer

    from lm_eval_lowrank.checkpoint import load_compressed
    from lm_eval_lowrank.heal import heal_model

    tok = AutoTokenizer.from_pretrained(str(ckpt))
    groups = [WORDS[0:6], WORDS[6:12], WORDS[12:18]]  # disjoint words: a block's first token names its source
    sources = [[" ".join(g[(i * 7) % 6] for i in range(600))] for g in groups]
    ids = [set(tok(" ".join(g), add_special_tokens=False)["input_ids"]) for g in groups]
    model = load_compressed(ckpt)
    seen = collections.Counter()
    forward = model.forward

    def spy(*a, input_ids=None, **k):
        if model.training:
            for row in input_ids:
                seen[next(i for i, g in enumerate(ids) if int(row[0]) in g)] += 1
        return forward(*a, input_ids=input_ids, **k)

    model.forward = spy
    steps, batch = 5, 2  # 10 blocks over 3 sources
    rec = heal_model(model, tok, sources, steps=steps, lr=1e-4, seq_len=16, batch_size=batch, progress=False)
    counts = [m["train_blocks"] for m in rec["data_mix"]]
    assert sum(counts) == steps * batch and max(counts) - min(counts) <= 1
    assert counts == [seen[i] for i in range(len(groups))]


def test_a_file_trained_on_twice_or_evaluated_on_is_refused(ckpt, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from lm_eval_lowrank.cli.checkpoint import heal

    _no_load(monkeypatch)
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text(TEXT)
    (folder / "b.txt").write_text(HELD_TEXT)
    base = [str(ckpt), "--out", str(tmp_path / "o"), "--steps", "2", "--seq_len", "16"]
    run = lambda *extra: CliRunner().invoke(heal, base + list(extra))  # noqa: E731
    _one_line_error(run("--data", str(folder), "--data", str(folder / "b.txt")), "--data", "b.txt", "twice")
    _one_line_error(run("--data", str(folder / "a.txt"), "--data", str(tmp_path / "texts" / ".." / "texts" / "a.txt")), "--data", "a.txt", "twice")
    _one_line_error(run("--data", str(folder), "--eval_data", str(folder / "a.txt")), "--eval_data", "a.txt", "training text")


def test_eval_blocks_needs_eval_data(ckpt, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from lm_eval_lowrank.cli.checkpoint import heal

    _no_load(monkeypatch)
    data = tmp_path / "t.txt"
    data.write_text(TEXT)
    r = CliRunner().invoke(heal, [str(ckpt), "--out", str(tmp_path / "o"), "--data", str(data), "--eval_blocks", "4"])
    _one_line_error(r, "--eval_blocks 4", "needs --eval_data")
    held = tmp_path / "held.txt"
    held.write_text(" ".join(WORDS[i % 11] for i in range(300)))
    r = CliRunner().invoke(heal, [str(ckpt), "--out", str(tmp_path / "o"), "--data", str(data), "--eval_data", str(held), "--eval_blocks", "100000", "--seq_len", "32"])
    _one_line_error(r, "--eval_blocks 100000 is invalid", "holds only", "blocks of --seq_len 32 tokens")  # scored fewer, without a word
    assert r.exit_code == 2


def test_heal_never_writes_over_the_checkpoint_it_reads(ckpt, tmp_path, monkeypatch):
    """`heal CKPT --out CKPT --overwrite` replaced the checkpoint it was reading with the healed one."""
    import hashlib

    from click.testing import CliRunner

    from lm_eval_lowrank.cli.checkpoint import heal

    _no_load(monkeypatch)
    before = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in ckpt.iterdir() if f.is_file()}
    for out in (str(ckpt), str(ckpt) + "/", str(ckpt / ".." / ckpt.name)):
        r = CliRunner().invoke(heal, [str(ckpt), "--out", out, "--overwrite", "--steps", "1"])
        _one_line_error(r, "is the checkpoint being healed; choose a new folder (nothing was changed)")
        assert r.exit_code == 2
    assert {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in ckpt.iterdir() if f.is_file()} == before
    r = CliRunner().invoke(heal, [str(tmp_path / "nowhere"), "--out", str(tmp_path / "o"), "--steps", "1"])
    _one_line_error(r, "nowhere does not exist; give a compressed checkpoint")


def test_a_failing_step_restores_the_model_state_and_closes_the_bar(ckpt, monkeypatch):
    from transformers import AutoTokenizer

    import lm_eval_lowrank.heal as heal_module
    from lm_eval_lowrank.checkpoint import load_compressed

    class Bar:
        closed = False

        def set_postfix(self, **_k):
            pass

        def update(self, _n):
            pass

        def close(self):
            Bar.closed = True

    monkeypatch.setattr(heal_module, "_bar", lambda total, enabled: Bar())
    model = load_compressed(ckpt)
    frozen = next(n for n, _ in model.named_parameters() if not n.endswith((".first", ".last", ".core")))
    model.get_parameter(frozen).requires_grad_(False)  # a mixed entry state, to be given back as it was
    entry = {n: p.requires_grad for n, p in model.named_parameters()}
    calls = {"train": 0}
    forward = model.forward

    def flaky(*a, **k):
        if model.training:
            calls["train"] += 1
            if calls["train"] == 2:
                raise RuntimeError("out of memory (simulated)")
        return forward(*a, **k)

    model.forward = flaky
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    with pytest.raises(RuntimeError, match="simulated"):
        heal_module.heal_model(model, tok, [TEXT], steps=4, lr=1e-3, seq_len=16, batch_size=2)
    assert not model.training and Bar.closed
    assert {n: p.requires_grad for n, p in model.named_parameters()} == entry
    assert all(p.grad is None for p in model.parameters())


def test_holdout_blocks_must_be_at_least_one(ckpt):
    from transformers import AutoTokenizer

    from lm_eval_lowrank.checkpoint import load_compressed
    from lm_eval_lowrank.heal import HealError, heal_model

    tok = AutoTokenizer.from_pretrained(str(ckpt))
    with pytest.raises(HealError, match="holdout_blocks=0 is invalid"):
        heal_model(load_compressed(ckpt), tok, [TEXT], steps=1, lr=1e-3, seq_len=16, batch_size=2, holdout_blocks=0, progress=False)


def test_perplexity_of_a_diverged_heal_is_inf_not_an_overflow(monkeypatch):
    """A loss past exp's range (a heal that diverged) must still let the record be written and saved."""
    import lm_eval_lowrank.heal as heal_mod

    monkeypatch.setattr(heal_mod, "mean_loss", lambda *a, **k: 800.0)
    assert heal_mod.perplexity(None, None) == float("inf")
    monkeypatch.setattr(heal_mod, "mean_loss", lambda *a, **k: 2.0)
    assert heal_mod.perplexity(None, None) == pytest.approx(7.389056)
