"""The low-rank design space: its size, and what one point of it costs and saves.

Pure Python (no torch, no weights): everything is worked out from a model config, through
the same :func:`~lm_eval_lowrank.plan.make_plan` that decompose-on-load uses, so the
parameter counts printed here are the ones a run with the same ``model_args`` gets.

The design space follows Moar et al., "Characterizing the Accuracy-Efficiency Trade-off of
Low-rank Decomposition in Language Models" (2024): three axes, the pruned rank, which layers
and which tensors. With ``Nt`` tensors per layer, ``Nl`` layers and ``R`` possible ranks,

    |S| = (2^Nt - 1) * (2^Nl - 1) * R + 1

(any non-empty tensor subset x any non-empty layer subset x a rank, plus the dense model).

FLOPs convention (per token, one forward pass, 2 FLOPs per multiply-accumulate):

- matmuls only: every decoder projection (``2 * out * in``) and the LM head
  (``2 * vocab * hidden``; BERT is counted as an encoder, without a head). Norms,
  activations, softmax, biases and embedding lookups are left out.
- attention: scores ``Q K^T`` and context ``A V`` each cost ``2 * seq_len * n_heads * head_dim``
  per layer, with ``seq_len`` the number of attended positions (full context, no causal
  halving), so ``4 * layers * seq_len * n_heads * head_dim`` in all. Low-rank factors keep
  the projections' output width, so decomposition leaves this term unchanged.
- a decomposed linear costs ``2 * r(m+n)`` (folded) or ``2 * (r(m+n) + r²)`` (Tucker), i.e.
  twice its stored parameters, like the dense one.
- mixture-of-experts projections: a token multiplies by the matrices of the experts it is routed to
  (``num_experts_per_tok`` of them), so they count that many times, dense or decomposed; all of them when the
  config names no top-k. Every token also meets each expert layer's router (``2 * hidden * experts``), which
  is never decomposed.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .architectures import ArchitectureAdapter, GenericAdapter, config_int, config_side_adapter, config_value, experts_per_token, known_architectures, text_config
from .plan import Plan, make_plan
from .spec import DecompositionSpec, SpecError

# -- built-in configs ---------------------------------------------------------------
# Only the fields the adapters read; the param counts are checked in tests against the
# published totals (Llama-2 from the HF checkpoints, SmolLM2 from its safetensors).
BUILTIN_CONFIGS: dict[str, dict[str, Any]] = {
    "llama-2-7b": {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
    },
    "llama-2-13b": {
        "model_type": "llama",
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
        "num_key_value_heads": 40,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
    },
    "llama-2-70b": {
        "model_type": "llama",
        "hidden_size": 8192,
        "intermediate_size": 28672,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,  # grouped-query attention
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
    },
    "bert-base": {
        "model_type": "bert",
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "vocab_size": 30522,
        "max_position_embeddings": 512,
        "type_vocab_size": 2,
    },
    "bert-large": {
        "model_type": "bert",
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "vocab_size": 30522,
        "max_position_embeddings": 512,
        "type_vocab_size": 2,
    },
    "smollm2-135m": {
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "vocab_size": 49152,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
    },
    # mixture-of-experts: 8 experts, 2 routed per token (46.7B in all, 12.9B active)
    "mixtral-8x7b": {
        "model_type": "mixtral",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "vocab_size": 32000,
        "max_position_embeddings": 32768,
        "rope_theta": 1e6,
        "tie_word_embeddings": False,
    },
    # 64 experts, 8 routed per token (6.9B in all, 1.3B active)
    "olmoe-1b-7b": {
        "model_type": "olmoe",
        "hidden_size": 2048,
        "intermediate_size": 1024,
        "num_hidden_layers": 16,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "num_experts": 64,
        "num_experts_per_tok": 8,
        "vocab_size": 50304,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
    },
    "gpt2": {
        "model_type": "gpt2",
        "n_embd": 768,
        "n_layer": 12,
        "n_head": 12,
        "n_positions": 1024,
        "vocab_size": 50257,
        "n_inner": None,
        "tie_word_embeddings": True,  # said here, so no transformers lookup of the default
    },
}

# Hub ids people type out of habit; resolved offline to the built-ins above.
_ALIASES = {
    "meta-llama/llama-2-7b-hf": "llama-2-7b",
    "meta-llama/llama-2-13b-hf": "llama-2-13b",
    "meta-llama/llama-2-70b-hf": "llama-2-70b",
    "bert-base-uncased": "bert-base",
    "bert-large-uncased": "bert-large",
    "huggingfacetb/smollm2-135m": "smollm2-135m",
    "huggingfacetb/smollm2-135m-instruct": "smollm2-135m",
    "smollm2-135m-instruct": "smollm2-135m",
    "openai-community/gpt2": "gpt2",
    "mistralai/mixtral-8x7b-v0.1": "mixtral-8x7b",
    "mistralai/mixtral-8x7b-instruct-v0.1": "mixtral-8x7b",
    "allenai/olmoe-1b-7b-0924": "olmoe-1b-7b",
}


def builtin_names() -> list[str]:
    return list(BUILTIN_CONFIGS)


def load_config(model: str) -> dict[str, Any]:
    """A config dict from a built-in name, a ``config.json`` path, a folder holding one, or a Hugging Face Hub id
    (its ``config.json`` alone is fetched, or read from the local Hub cache when offline).

    Raises :class:`SpecError` (one line, listing the built-in names) when none fits.
    """
    key = str(model).strip()
    name = _ALIASES.get(key.lower(), key.lower())
    if name in BUILTIN_CONFIGS:
        return {"_name": name, **BUILTIN_CONFIGS[name]}
    path = Path(key).expanduser()
    if path.is_dir():
        path = path / "config.json"
        if not path.is_file():
            raise SpecError(f"model={model!r} is invalid: the folder holds no config.json; built-in names: {', '.join(BUILTIN_CONFIGS)}")
    if path.is_file():
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SpecError(f"model={model!r} is invalid: cannot read {path} as JSON ({exc.__class__.__name__})") from None
        if not isinstance(cfg, dict):
            raise SpecError(f"model={model!r} is invalid: {path} does not hold a JSON object")
        return {"_name": str(path.parent.name or path), **cfg}
    if _HUB_ID.match(key):
        return _hub_config(model, key)
    raise SpecError(
        f"model={model!r} is invalid: not a built-in name, a config.json, a folder holding one or a Hub id; "
        f"built-in names: {', '.join(BUILTIN_CONFIGS)}"
    )


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _hub_config(model: str, repo_id: str) -> dict[str, Any]:
    import logging

    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    try:
        from huggingface_hub import hf_hub_download

        hub_log.setLevel(logging.CRITICAL)  # its retry warnings would add lines to the one-line error
        path = Path(hf_hub_download(repo_id, "config.json"))
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except Exception as exc:  # offline and not cached, no such repo, gated without a token, bad JSON
        detail = (str(exc).strip().splitlines() or [""])[0][:200]
        raise SpecError(
            f"model={model!r} is invalid: not a built-in name or a local config, and its config.json could not be "
            f"read from the Hugging Face Hub ({exc.__class__.__name__}{': ' + detail if detail else ''}); "
            f"built-in names: {', '.join(BUILTIN_CONFIGS)}"
        ) from None
    finally:
        hub_log.setLevel(level)
    if not isinstance(cfg, dict):
        raise SpecError(f"model={model!r} is invalid: its config.json on the Hub does not hold a JSON object")
    return {"_name": repo_id.rsplit("/", 1)[-1], **cfg}


def config_adapter(config: Mapping[str, Any]) -> ArchitectureAdapter:
    """The adapter for a config: a known family's, else one read off an empty model of the config; a one-line
    SpecError otherwise."""
    adapter = config_side_adapter(config)
    if adapter is None:
        mt = config.get("model_type") if isinstance(config, Mapping) else getattr(config, "model_type", None)
        raise SpecError(
            f"model_type={mt!r} is invalid: transformers cannot build a causal LM from this config here, and no "
            f"adapter knows it; adapters exist for: {', '.join(known_architectures())}"
        )
    return adapter



# -- design-space size ----------------------------------------------------------------
def design_space_size(n_tensors: int, n_layers: int, rank: int) -> int:
    """|S| = (2^Nt - 1)(2^Nl - 1) * rank + 1, exact (Python ints do not overflow).

    ``rank`` is the number of rank choices (the full rank, e.g. the hidden size).
    """
    for name, v in (("n_tensors", n_tensors), ("n_layers", n_layers), ("rank", rank)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise SpecError(f"{name}={v!r} is invalid: expected an int >= 1")
    return ((1 << n_tensors) - 1) * ((1 << n_layers) - 1) * rank + 1


def log2_design_space_size(n_tensors: int, n_layers: int, rank: int) -> float:
    # math.log2 takes arbitrary-size ints without going through a float that could overflow.
    return math.log2(design_space_size(n_tensors, n_layers, rank))


# -- calculator -------------------------------------------------------------------------
@dataclass
class SpaceReport:
    """One point of the design space, costed from the config alone."""

    model: str
    adapter: str
    layout: str
    num_layers: int
    tensors: list[str]
    hidden_size: int
    rank_choices: int
    spec: dict[str, Any]
    params_total: int
    params_removed: int
    params_after: int
    param_reduction: float
    decomposed_modules: int
    kept_dense: int
    seq_len: int
    linear_flops_before: int
    attention_flops: int
    flops_before: int
    flops_after: int
    flop_reduction: float
    design_space_size: int
    log2_design_space_size: float
    modules: list[dict[str, Any]] | None = field(default=None)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["modules"] is None:
            d.pop("modules")
        return d


def _attention_width(config: Any, adapter: ArchitectureAdapter) -> int:
    """n_heads * head_dim: the width of the query/context in attention."""
    c = text_config(config)
    if adapter.name == "gpt2":
        return config_int(c, "n_embd", "hidden_size")
    h = _hidden(config)
    n = config_value(c, "num_attention_heads", "n_head", "num_heads")
    if n is None:
        return 0  # no attention (e.g. a state-space model)
    return int(n) * int(config_value(c, "head_dim", default=h // int(n)))


def _router_params(adapter: ArchitectureAdapter, n_layers: int, hidden: int) -> int:
    """Weights of the routers that score experts (hidden x experts), one in every layer holding stacked experts."""
    stacked = [t for t in adapter.tensor_names() if adapter.experts_of(t)]
    layers = {layer for t in stacked for layer in adapter.layers_of(t, n_layers)}
    return len(layers) * hidden * max((adapter.experts_of(t) for t in stacked), default=0)


def _head_params(config: Any, adapter: ArchitectureAdapter) -> int:
    """The LM head matmul (vocab x hidden), tied or not; BERT is costed as an encoder."""
    if adapter.name == "bert":
        return 0
    if isinstance(adapter, GenericAdapter):
        return adapter.head_params
    c = text_config(config)
    return config_int(c, "vocab_size") * config_int(c, "hidden_size", "n_embd")


def _hidden(config: Any) -> int:
    return config_int(text_config(config), "hidden_size", "n_embd", "d_model")


def calculate(
    config: Any,
    spec: DecompositionSpec | Mapping[str, Any] | None = None,
    *,
    seq_len: int = 1024,
    rank_choices: int | None = None,
    per_module: bool = False,
    model_name: str | None = None,
) -> SpaceReport:
    """Cost one uniform configuration (rank x layers x tensors) of ``config``.

    ``spec`` is a :class:`DecompositionSpec` or the raw ``model_args``-style values
    (``{"rank": 1, "layers": "3|30", "tensors": "all", "layout": "tucker"}``).
    ``rank_choices`` is the design space's rank axis; default the hidden size.
    """
    if spec is None:
        spec = DecompositionSpec()
    elif not isinstance(spec, DecompositionSpec):
        spec = DecompositionSpec.from_args(spec)
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 0:
        raise SpecError(f"seq_len={seq_len!r} is invalid: expected an int >= 0")
    if rank_choices is not None and (isinstance(rank_choices, bool) or not isinstance(rank_choices, int) or rank_choices < 1):
        raise SpecError(f"rank_choices={rank_choices!r} is invalid: expected an int >= 1 (the size of the rank axis)")
    if spec.budget is not None:  # the plan would hold no targets: a 0 % reduction that is no answer
        raise SpecError(
            f"budget={spec.budget:g} is invalid here: the calculator needs explicit ranks (rank=N, or per tensor like "
            "rank=8|q:4); a budget's ranks come from allocating it over the weights, which the calculator does not load"
        )
    adapter = config_adapter(config)
    with warnings.catch_warnings():
        # make_plan warns about ranks that save nothing; the report counts them instead.
        warnings.simplefilter("ignore")
        plan: Plan = make_plan(spec, config, adapter)
    n_layers = adapter.num_layers(config)
    shapes = adapter.tensor_shapes(config)
    hidden = _hidden(config)
    rank_choices = hidden if rank_choices is None else rank_choices

    total = adapter.param_count(config)
    removed = plan.params_removed
    active = experts_per_token(config)

    def share(tensor: str) -> float:
        """The fraction of a tensor's matrices one token multiplies by: its routed experts' (all for a linear)."""
        n = adapter.experts_of(tensor)
        return min(active, n) / n if n and active else 1.0

    # every layer's projections (a tensor that only some layers hold counts in those)
    linears = sum(len(adapter.layers_of(t, n_layers)) * max(1, adapter.experts_of(t)) * o * i * share(t) for t, (o, i) in shapes.items())
    linear_flops = round(2 * (linears + _router_params(adapter, n_layers, hidden) + _head_params(config, adapter)))
    attn_flops = 4 * n_layers * seq_len * _attention_width(config, adapter)
    before = linear_flops + attn_flops
    # each decomposed matrix costs twice its stored params; a token meets only its routed experts' matrices
    after = before - round(2 * sum((t.dense_params - t.lowrank_params(plan.layout)) * share(t.tensor) for t in plan.targets))

    modules = None
    if per_module:
        modules = [
            {
                "path": t.path,
                "layer": t.layer,
                "tensor": t.tensor,
                "shape": [t.out_features, t.in_features],
                "rank": t.rank,
                "params_before": t.dense_params,
                "params_after": t.lowrank_params(plan.layout),
            }
            for t in plan.targets
        ]
    return SpaceReport(
        model=model_name or str(config_value(config, "_name", "model_type", default="?")),
        adapter=adapter.name,
        layout=plan.layout,
        num_layers=n_layers,
        tensors=list(adapter.tensor_names()),
        hidden_size=hidden,
        rank_choices=rank_choices,
        spec={k: spec.to_dict()[k] for k in ("rank", "layers", "tensors")},
        params_total=total,
        params_removed=removed,
        params_after=total - removed,
        param_reduction=removed / total,
        decomposed_modules=len(plan.targets),
        kept_dense=len(plan.skipped),
        seq_len=seq_len,
        linear_flops_before=linear_flops,
        attention_flops=attn_flops,
        flops_before=before,
        flops_after=after,
        flop_reduction=(before - after) / before,
        design_space_size=design_space_size(len(shapes), n_layers, rank_choices),
        log2_design_space_size=log2_design_space_size(len(shapes), n_layers, rank_choices),
        modules=modules,
    )


# -- candidate generation ------------------------------------------------------------------
# Table 4 of the paper (Llama-2-7B, rank 1, all seven tensors): 1-based layers -> % size cut.
TABLE4_LLAMA2_7B: tuple[tuple[tuple[int, ...], int], ...] = (
    ((3, 30), 6),
    ((3, 18, 32), 9),
    ((3, 9, 15, 21, 27), 15),
    ((5, 9, 13, 17, 21, 25, 29), 21),
    ((3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 32), 33),
    (tuple(range(1, 32, 2)), 48),
)


def _valid(layers: Iterable[int], num_layers: int) -> tuple[int, ...]:
    return tuple(sorted({x for x in layers if 1 <= x <= num_layers}))


def table4_layer_sets(num_layers: int) -> dict[str, tuple[int, ...]]:
    """The paper's Table 4 layer sets, rewritten as rules of the depth ``L``.

    Anchors are kept relative to the ends and strides are kept in layers, so for ``L = 32``
    the sets are exactly the paper's, and deeper models get proportionally more layers
    (every third layer stays a third of the model). Sets that come out empty are dropped.
    """
    L = _check_layers(num_layers)
    sets = {
        "2-layers": _valid((3, L - 2), L),  # 3,30
        "3-layers": _valid((3, (L + 4) // 2, L), L),  # 3,18,32
        "stride-6": _valid(range(3, L - 4, 6), L),  # 3,9,...,27
        "stride-4": _valid(range(5, L - 2, 4), L),  # 5,9,...,29
        "stride-3": _valid([*range(3, L - 1, 3), L], L),  # 3,6,...,30,32
        "odd": _valid(range(1, L, 2), L),  # 1,3,...,31
    }
    return {k: v for k, v in sets.items() if v}


def _check_layers(num_layers: int) -> int:
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise SpecError(f"num_layers={num_layers!r} is invalid: expected an int >= 1")
    return num_layers


def spread_layer_sets(num_layers: int, k: int, avoid_first: int = 2, avoid_last: int = 1) -> tuple[int, ...]:
    """``k`` layers spread as evenly as possible over the allowed band.

    The pruning rules: whole layers, skip the first ``avoid_first`` and the last
    ``avoid_last`` layers (they hurt accuracy most), keep the chosen layers far apart.
    Both ends of the band are used from ``k = 2`` on, which maximises the smallest gap.
    """
    L = _check_layers(num_layers)
    lo, hi = avoid_first + 1, L - avoid_last
    band = hi - lo + 1
    if avoid_first < 0 or avoid_last < 0:
        raise SpecError("avoid_first and avoid_last must be >= 0")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k > band:
        raise SpecError(f"k={k!r} is invalid: {max(band, 0)} layers are allowed in a {L}-layer model (layers {lo}..{hi})")
    if k == 1:
        return ((lo + hi) // 2,)
    # integer round-half-up of lo + i * (band - 1) / (k - 1): exact and distinct since k <= band
    return tuple(lo + (2 * i * (band - 1) + (k - 1)) // (2 * (k - 1)) for i in range(k))


def single_layers(num_layers: int) -> list[tuple[int]]:
    """Every layer on its own: the per-layer sensitivity sweep."""
    return [(x,) for x in range(1, _check_layers(num_layers) + 1)]


_ATTN = {"q", "k", "v", "o", "qkv"}
_MLP = {"gate", "up", "down"}
# Words of the module-path segments (split at "_") that hold attention: self_attn (Llama), attn (GPT-2, GPT-J),
# attention (GPT-NeoX, BERT, RWKV), self_attention (Bloom, Falcon), encoder_attn / cross_attn, linear_attn
# (Qwen3-Next), multi_head_attention (CTRL), self_att (CPM-Ant). "attn" is no substring of "attention", so words.
_ATTN_WORDS = frozenset({"attn", "attention", "attentions", "att"})
# ... and the MLP or mixture-of-experts block: mlp, feed_forward, ffn, experts, shared_expert(s), block_sparse_moe,
# mlp_block; BERT's FFN is intermediate.dense then output.dense (its attention's output sits under attention.).
_MLP_WORDS = frozenset({"mlp", "mlps", "ffn", "ff", "feed", "forward", "moe", "expert", "experts", "intermediate", "output"})
# Leaf names for tensors whose path names no block: OPT/BioGPT keep fc1/fc2 in the layer itself, Nemotron-H and
# RecurrentGemma keep attention in a generic "mixer"/"temporal_block" beside their SSM/recurrence projections.
_ATTN_LEAF = re.compile(r"(q|k|v|o|qk|qkv|query|key|value|query_key_value|wqkv|c_attn)(_proj|_lin)?", re.IGNORECASE)
_MLP_LEAF = re.compile(r"(gate|up|down|gate_up|fc\d*|fc_in|fc_out|c_fc|w[123]|dense_h_to_4h|dense_4h_to_h)(_proj)?", re.IGNORECASE)


def tensor_kind(adapter: ArchitectureAdapter, tensor: str) -> str | None:
    """``"attn"``, ``"mlp"`` or ``None`` (neither: an SSM mixer's, a recurrence's projections) for one tensor.

    The blocks the module path passes through decide first; a path that names none falls back on the leaf name.
    """
    *blocks, leaf = adapter.tensor_paths[tensor].split(".")
    words: set[str] = set()
    for block in blocks:
        block_words = set(block.lower().split("_"))
        # a norm's name says where it sits, not what it holds (AXK2 keeps an MLP inside post_attention_layernorm)
        if not block_words & {"norm", "layernorm", "ln"}:
            words |= block_words
    if words & _ATTN_WORDS:
        return "attn"
    if words & _MLP_WORDS:
        return "mlp"
    if tensor in _ATTN or _ATTN_LEAF.fullmatch(leaf):
        return "attn"
    if tensor in _MLP or _MLP_LEAF.fullmatch(leaf):
        return "mlp"
    return None


def tensor_groups(adapter: ArchitectureAdapter) -> dict[str, tuple[str, ...]]:
    """Tensor subsets to sweep: each tensor alone, the attention group, the MLP (and experts) group, all.

    A tensor that is neither (a Mamba mixer's in_proj) is only in ``all`` and on its own.
    """
    names = adapter.tensor_names()
    groups: dict[str, tuple[str, ...]] = {t: (t,) for t in names}
    kinds = {t: tensor_kind(adapter, t) for t in names}
    attn = tuple(t for t in names if kinds[t] == "attn")
    mlp = tuple(t for t in names if kinds[t] == "mlp")
    if attn:
        groups["attn"] = attn
    if mlp:
        groups["mlp"] = mlp
    groups["all"] = tuple(names)
    return groups
