"""Healing fine-tune: a few steps of factor training lower the loss and save a loadable checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from test_checkpoint import SPEC, WORDS, load_dense, make_tiny_dir

# Repetitive text the tiny model can fit within a few steps.
TEXT = " ".join(WORDS[i % 7] + " " + WORDS[(i * 3) % 11] for i in range(3000))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from transformers import AutoTokenizer

    from lm_eval_lowrank.api import compress_model
    from lm_eval_lowrank.checkpoint import save_compressed

    src = make_tiny_dir(tmp_path_factory.mktemp("heal_src"))
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
    assert r.exit_code != 0 and "--data" in r.output and "does not exist" in r.output
    r = CliRunner().invoke(heal, [str(tmp_path), "--out", str(tmp_path / "o"), "--steps", "1"])
    assert r.exit_code != 0 and "not a compressed checkpoint" in r.output
