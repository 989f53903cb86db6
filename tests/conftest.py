"""Shared fixtures: tiny random-weight models (fast) and the real SmolLM2 (slow tests)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    kw = dict(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


@pytest.fixture
def tiny_llama():
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config()).eval()


@pytest.fixture
def solve_pools(monkeypatch):
    """The worker counts of the thread pools decompose opens for parallel solves, in order."""
    import lm_eval_lowrank.decompose as dec

    pools = []

    class CountingPool(dec.ThreadPoolExecutor):
        def __init__(self, workers):
            pools.append(workers)
            super().__init__(workers)

    monkeypatch.setattr(dec, "ThreadPoolExecutor", CountingPool)
    return pools


@pytest.fixture(scope="session")
def smollm2_dir():
    from lm_eval_lowrank.assets import smollm2_path

    return smollm2_path()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_dir):
    """A 4-layer random Llama with SmolLM2's tokenizer, saved once for the session (tests only read it)."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), smollm2_dir, num_hidden_layers=4, max_position_embeddings=256)


@pytest.fixture
def benchmark_data():
    """The shared benchmark data folder (calibration reads it), or a skip where it is absent."""
    from lm_eval_lowrank.calibration import data_root
    from lm_eval_lowrank.spec import SpecError

    try:
        return data_root()
    except SpecError:
        pytest.skip("benchmark data folder not available")


def save_tiny_llama(out, tokenizer_dir, **overrides):
    """A random-weight tiny Llama with SmolLM2's real tokenizer (49152 tokens), saved as an HF folder."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(**{"vocab_size": 49152, **overrides})).eval().save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


ARC_TASK_YAML = """task: {name}
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
training_split: null
validation_split: null
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{choices.label.index(answerKey)}}}}"
doc_to_choice: "{{{{choices.text}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def run_side_by_side(*commands: dict) -> list:
    """``subprocess.run(**kw)`` for each of ``commands`` at once, results in order. The command-line tests spend
    most of their time importing lm-eval, one core each: side by side they take the time of the slowest."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(commands)) as pool:
        runs = [pool.submit(subprocess.run, capture_output=True, text=True, **kw) for kw in commands]
        return [r.result() for r in runs]


def write_arc_task(directory, name):
    """A one-file ARC-Easy task over the shared data (the local task suite is tested on its own)."""
    from lm_eval_lowrank.tasks import data_dir

    (directory / f"{name}.yaml").write_text(ARC_TASK_YAML.format(name=name, data=data_dir() / "arc_easy" / "test.jsonl"))
    return directory


def list_experts_model(text_layers: int = 2, vision_layers: int = 0, experts: int = 6):
    """A toy decoder whose layers keep their experts in a list, a router beside them (transformers 4's Mixtral,
    DeepSeek's remote code), next to an optional vision tower's layer list; the config counts the text layers."""
    from types import SimpleNamespace

    from torch import nn

    class Expert(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = nn.Linear(8, 12)

    class MoEBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(8, 8)
            self.router = nn.Linear(8, experts, bias=False)
            self.experts = nn.ModuleList([Expert() for _ in range(experts)])

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = SimpleNamespace(num_hidden_layers=text_layers)
            self.vision = nn.ModuleList([nn.Linear(8, 8) for _ in range(vision_layers)])
            self.layers = nn.ModuleList([MoEBlock() for _ in range(text_layers)])

    return Toy()
