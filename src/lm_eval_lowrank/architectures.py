"""Architecture adapters: where each architecture keeps its decoder layers and projections.

An adapter answers two kinds of question:

- from a config alone (no weights): the number of layers, each tensor's (out, in) shape
  and the total parameter count. This is what validation before load and the
  design-space calculator use.
- from a loaded model: the layer list and the module behind each tensor short name.

Short names are ``q, k, v, o, gate, up, down`` for the Llama family. GPT-2 fuses q, k and v
into one ``c_attn`` Conv1D, exposed as the single tensor ``qkv`` (out = 3 x hidden).
Unknown architectures with plain ``nn.Linear`` projections use :class:`GenericAdapter`,
whose short names are the linear's leaf names inside a layer (e.g. ``q_proj``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from .spec import SpecError


def config_value(config: Any, *names: str, default: Any = None) -> Any:
    """The first of ``names`` set in a config (a mapping or an object), else ``default``."""
    for n in names:
        v = config.get(n) if isinstance(config, Mapping) else getattr(config, n, None)
        if v is not None:
            return v
    return default


def config_int(config: Any, *names: str) -> int:
    """``int`` of the first of ``names`` set in a config: a field the shapes or counts need. A config without it
    is a one-line :class:`SpecError` naming the field, not ``int(None)``'s TypeError."""
    v = config_value(config, *names)
    if v is None:
        others = f" (nor {', '.join(names[1:])})" if len(names) > 1 else ""
        model_type = config_value(config, "model_type", default="this model")
        raise SpecError(f"the config has no {names[0]}{others}, which {model_type}'s tensor shapes and parameter count need")
    # every field read here is a size or a count: "x", 2.5 or 0 failed as int()'s ValueError or counted nonsense
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        name = next(n for n in names if config_value(config, n) is not None)
        raise SpecError(f"the config's {name}={v!r} is invalid: expected an int >= 1")
    return v


# Model types whose positions are a learned (or fixed) table: a sequence past its end fails inside the model.
_TABLE_POSITION_TYPES = frozenset({"gpt2", "gpt_neo", "gpt_bigcode", "opt", "biogpt", "openai-gpt", "ctrl", "xglm"})
_ROTARY_KEYS = ("rope_theta", "rope_scaling", "rope_parameters", "rotary_dim", "rotary_pct", "rotary_emb_base", "partial_rotary_factor")


def position_limit(config: Any) -> tuple[str, int, bool] | None:
    """(the config field, how many positions it gives, whether they are a table a longer sequence cannot run past)
    of a config (object or dict), or None when it names no limit. Rotary models run past theirs, extrapolated."""
    cfg = text_config(config)
    field = next((f for f in ("n_positions", "max_position_embeddings") if isinstance(config_value(cfg, f), int) and config_value(cfg, f) > 0), None)
    if field is None:
        return None
    rotary = any(config_value(cfg, k) is not None for k in _ROTARY_KEYS)
    table = str(config_value(cfg, "model_type", default="")) in _TABLE_POSITION_TYPES and not rotary
    return field, int(config_value(cfg, field)), table


def text_config(config: Any) -> Any:
    """Multimodal configs (e.g. Gemma-3) keep the language model's fields in ``text_config``."""
    sub = config_value(config, "text_config")
    return sub if sub is not None else config


def tied_word_embeddings(config: Any) -> bool:
    """Whether the LM head shares the input embeddings' matrix (counted once).

    The top-level config decides, as in transformers (a multimodal wrapper's own flag, not its text config's). A
    config.json without the key gets its model_type's default: Gemma, Gemma-2 and Gemma-3 tie by default and their
    published configs leave the key out.
    """
    value = config_value(config, "tie_word_embeddings")
    return bool(value) if value is not None else _default_tie(model_type_of(config))


@lru_cache(maxsize=None)
def _default_tie(model_type: str) -> bool:
    """transformers' default ``tie_word_embeddings`` for ``model_type``; False when it cannot say."""
    if not model_type:
        return False
    try:
        import transformers

        with _quiet_transformers():
            return bool(getattr(transformers.AutoConfig.for_model(model_type), "tie_word_embeddings", False))
    except Exception:  # transformers missing, or a model_type it does not know
        return False


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' logger at ERROR and warnings off: building configs or empty models only to read them."""
    import logging
    import warnings

    log = logging.getLogger("transformers")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


@dataclass(frozen=True)
class ArchitectureAdapter:
    name: str
    model_types: tuple[str, ...]
    layers_path: str  # dotted path from the CausalLM to the ModuleList of decoder layers
    tensor_paths: dict[str, str]  # short name -> dotted path inside one layer
    has_bias: dict[str, bool] | None = None
    # Tensors grouped by the input they share, in forward order (staged calibration); None = one stage.
    stages: tuple[tuple[str, ...], ...] | None = None
    # Mixture-of-experts projections stored as one 3-D parameter: short name -> number of experts.
    # Their tensor_paths point at the parameter; tensor_shapes give one expert's (out, in).
    expert_counts: dict[str, int] | None = None
    # Tensors that only some layers hold: short name -> those layers (1-based). Unlisted: every layer.
    tensor_layers: dict[str, tuple[int, ...]] | None = None

    # -- config side -------------------------------------------------------------
    def tensor_names(self) -> tuple[str, ...]:
        return tuple(self.tensor_paths)

    def num_layers(self, config: Any) -> int:
        return config_int(text_config(config), "num_hidden_layers", "n_layer", "num_layers")

    def tensor_shapes(self, config: Any) -> dict[str, tuple[int, int]]:
        """(out_features, in_features) of each tensor, from the config."""
        raise NotImplementedError

    def param_count(self, config: Any) -> int:
        """Total parameters of the model, from the config."""
        raise NotImplementedError

    def layer_linear_params(self, config: Any) -> int:
        """Parameters of one layer's projections (of a layer holding every tensor)."""
        return sum(
            max(1, self.experts_of(t)) * o * i + (o if (self.has_bias or {}).get(t, False) else 0) for t, (o, i) in self.tensor_shapes(config).items()
        )

    def layers_of(self, tensor: str, num_layers: int) -> tuple[int, ...]:
        """The 1-based layers that hold ``tensor``."""
        held = (self.tensor_layers or {}).get(tensor)
        return tuple(range(1, num_layers + 1)) if held is None else held

    def experts_of(self, tensor: str) -> int:
        """How many experts a tensor stacks (0: an ordinary linear)."""
        return (self.expert_counts or {}).get(tensor, 0)

    def stage_of(self, tensor: str) -> int:
        """Index of the calibration stage of a tensor (unlisted tensors come last)."""
        for i, group in enumerate(self.stages or ()):
            if tensor in group:
                return i
        return len(self.stages or ())

    # -- model side --------------------------------------------------------------
    def layers(self, model: Any) -> Any:
        obj = model
        for part in self.layers_path.split("."):
            obj = getattr(obj, part)
        return obj

    def module_path(self, layer_index0: int, tensor: str) -> str:
        return f"{self.layers_path}.{layer_index0}.{self.tensor_paths[tensor]}"


class LlamaAdapter(ArchitectureAdapter):
    def tensor_shapes(self, config: Any) -> dict[str, tuple[int, int]]:
        c = text_config(config)
        h = config_int(c, "hidden_size")
        n = config_int(c, "num_attention_heads")
        kv = int(config_value(c, "num_key_value_heads", default=n))
        d = int(config_value(c, "head_dim", default=h // n))
        inter = config_int(c, "intermediate_size")
        return {
            "q": (n * d, h),
            "k": (kv * d, h),
            "v": (kv * d, h),
            "o": (h, n * d),
            "gate": (inter, h),
            "up": (inter, h),
            "down": (h, inter),
        }

    def param_count(self, config: Any) -> int:
        c = text_config(config)
        mt = model_type_of(c)
        h = config_int(c, "hidden_size")
        vocab = config_int(c, "vocab_size")
        tied = tied_word_embeddings(config)  # the top-level config's flag, or its model_type's default
        shapes = self.tensor_shapes(c)
        per_layer = self.layer_linear_params(c)  # projections (+ the adapter's fixed biases)
        if not self.has_bias and config_value(c, "attention_bias", default=False):
            per_layer += sum(shapes[t][0] for t in ("q", "k", "v", "o"))
        if config_value(c, "mlp_bias", default=False):
            per_layer += sum(shapes[t][0] for t in ("gate", "up", "down"))
        norms = _LLAMA_NORMS_PER_LAYER.get(mt, 2)  # Gemma-2/3 norm both sides of each block; OLMo's have no weights
        per_layer += norms * h
        if mt in _PER_HEAD_QK_NORM:
            per_layer += 2 * (shapes["q"][0] // config_int(c, "num_attention_heads"))
        elif mt == "olmo2":  # q/k RMSNorm over the whole projection
            per_layer += shapes["q"][0] + shapes["k"][0]
        final_norm = 0 if mt == "olmo" else h
        total = vocab * h * (1 if tied else 2) + self.num_layers(c) * per_layer + final_norm
        if c is not config:  # a multimodal wrapper (Gemma-3): add the vision tower and projector
            total += _siglip_vision_params(config)
        return total


_LLAMA_NORMS_PER_LAYER = {"gemma2": 4, "gemma3_text": 4, "olmo": 0}
_PER_HEAD_QK_NORM = ("qwen3", "gemma3_text")


def _siglip_vision_params(config: Any) -> int:
    """Gemma-3's SigLIP vision tower plus its projector into the language model."""
    v = config_value(config, "vision_config")
    h = config_int(v, "hidden_size")
    inter = config_int(v, "intermediate_size")
    patch = config_int(v, "patch_size")
    channels = int(config_value(v, "num_channels", default=3))
    positions = (config_int(v, "image_size") // patch) ** 2
    layer = 4 * (h * h + h) + (inter * h + inter) + (h * inter + h) + 2 * 2 * h  # attention, MLP, two LayerNorms
    embeddings = channels * patch * patch * h + h + positions * h
    vision = embeddings + config_int(v, "num_hidden_layers") * layer + 2 * h  # + post LayerNorm
    if config_value(v, "vision_use_head", default=True):  # SigLIP's attention-pooling head (off in Gemma-3)
        vision += h + (3 * h * h + 3 * h) + (h * h + h) + 2 * h + (inter * h + inter) + (h * inter + h)
    projector = h + h * config_int(text_config(config), "hidden_size")  # RMSNorm + projection
    return vision + projector


class GPT2Adapter(ArchitectureAdapter):
    def tensor_shapes(self, config: Any) -> dict[str, tuple[int, int]]:
        h = config_int(config, "n_embd", "hidden_size")
        inner = int(config_value(config, "n_inner", default=None) or 4 * h)
        return {"qkv": (3 * h, h), "o": (h, h), "up": (inner, h), "down": (h, inner)}

    def param_count(self, config: Any) -> int:
        h = config_int(config, "n_embd", "hidden_size")
        vocab = config_int(config, "vocab_size")
        pos = config_int(config, "n_positions", "max_position_embeddings")
        per_layer = self.layer_linear_params(config) + 4 * h  # two LayerNorms (weight + bias)
        head = 0 if tied_word_embeddings(config) else vocab * h  # GPT-2 ties by default
        return vocab * h + head + pos * h + self.num_layers(config) * per_layer + 2 * h


class BertAdapter(ArchitectureAdapter):
    """BERT encoders: config side only (the design-space tables cover them); not an lm-eval causal LM."""

    def tensor_shapes(self, config: Any) -> dict[str, tuple[int, int]]:
        h = config_int(config, "hidden_size")
        inter = config_int(config, "intermediate_size")
        return {"q": (h, h), "k": (h, h), "v": (h, h), "o": (h, h), "up": (inter, h), "down": (h, inter)}

    def param_count(self, config: Any) -> int:
        h = config_int(config, "hidden_size")
        vocab = config_int(config, "vocab_size")
        pos = config_int(config, "max_position_embeddings")
        types = int(config_value(config, "type_vocab_size", default=2))
        per_layer = self.layer_linear_params(config) + 2 * 2 * h  # two LayerNorms
        embeddings = (vocab + pos + types) * h + 2 * h
        pooler = h * h + h
        return embeddings + self.num_layers(config) * per_layer + pooler


_LLAMA_PATHS = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}
_ALL_BIAS = {"q": True, "k": True, "v": True, "o": True, "up": True, "down": True}
_LLAMA_STAGES = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))

ADAPTERS: tuple[ArchitectureAdapter, ...] = (
    LlamaAdapter("llama", ("llama", "mistral", "qwen3", "olmo", "olmo2", "granite", "smollm3"), "model.layers", _LLAMA_PATHS, stages=_LLAMA_STAGES),
    LlamaAdapter("qwen2", ("qwen2",), "model.layers", _LLAMA_PATHS, has_bias={"q": True, "k": True, "v": True}, stages=_LLAMA_STAGES),
    LlamaAdapter("gemma", ("gemma", "gemma2", "gemma3_text"), "model.layers", _LLAMA_PATHS, stages=_LLAMA_STAGES),
    # Gemma-3 with its vision tower: only the language model's layers are decomposed.
    LlamaAdapter("gemma3", ("gemma3",), "model.language_model.layers", _LLAMA_PATHS, stages=_LLAMA_STAGES),
    GPT2Adapter(
        "gpt2",
        ("gpt2",),
        "transformer.h",
        {"qkv": "attn.c_attn", "o": "attn.c_proj", "up": "mlp.c_fc", "down": "mlp.c_proj"},
        has_bias={"qkv": True, "o": True, "up": True, "down": True},
        stages=(("qkv",), ("o",), ("up",), ("down",)),
    ),
    BertAdapter(
        "bert",
        ("bert",),
        "bert.encoder.layer",
        {
            "q": "attention.self.query",
            "k": "attention.self.key",
            "v": "attention.self.value",
            "o": "attention.output.dense",
            "up": "intermediate.dense",
            "down": "output.dense",
        },
        has_bias=_ALL_BIAS,
    ),
)


class GenericAdapter(ArchitectureAdapter):
    """Fallback for other architectures: read off a model, the loaded one or an empty one built from the config.

    The decoder layers are the outermost ``nn.ModuleList`` as long as the config's layer count (else the longest
    outermost one); the tensors are the ``nn.Linear`` modules the layers
    hold at one path with one shape, named by their leaf names, and the stacked projections of transformers'
    mixture-of-experts modules, named ``<module>.<parameter>`` (e.g. ``experts.gate_up_proj``). A tensor that
    only some layers hold is offered for those layers (``tensor_layers``). Routers, and linears whose class has a
    forward of its own (Llama 4's router), are never offered; a peft wrapper is offered as the linear it wraps.
    """

    def tensor_shapes(self, config: Any) -> dict[str, tuple[int, int]]:
        return dict(self._shapes)

    def param_count(self, config: Any) -> int:
        total = getattr(self, "_param_count", None)
        if total is None:
            raise SpecError("the parameter calculator needs the config of this architecture; only the loaded model was seen")
        return total

    @classmethod
    def from_model(cls, model: Any) -> GenericAdapter:
        best_path, best_list = _decoder_layer_list(model)
        if best_list is None:
            raise SpecError(f"architecture {type(model).__name__}: no list of decoder layers found")
        # Layers may differ (DeepSeek's dense then MoE blocks, hybrid attention/SSM stacks): a projection held by
        # some layers only is offered for those (``tensor_layers``); one whose shape changes between layers is not.
        num_experts = config_expert_count(getattr(model, "config", None))
        per_layer = [_layer_projections(layer, num_experts) for layer in best_list]  # sub path -> (experts, out, in)
        shape_of: dict[str, tuple[int, int, int] | None] = {}
        held: dict[str, list[int]] = {}
        for i, found in enumerate(per_layer, 1):
            for sub, shape in found.items():
                shape_of[sub] = shape if shape_of.get(sub, shape) == shape else None
                held.setdefault(sub, []).append(i)
        everywhere = [sub for sub in shape_of if shape_of[sub] is not None and len(held[sub]) == len(per_layer)]
        some = [sub for sub in shape_of if shape_of[sub] is not None and len(held[sub]) < len(per_layer)]
        paths: dict[str, str] = {}
        shapes: dict[str, tuple[int, int]] = {}
        experts: dict[str, int] = {}
        layers: dict[str, tuple[int, ...]] = {}
        for sub in everywhere + some:  # names of the projections every layer holds first, as they always were
            n_exp, out_f, in_f = shape_of[sub]
            short = ".".join(sub.split(".")[-2:]) if n_exp else sub.split(".")[-1]
            # An item of a list inside the layer (an expert kept in a list) keeps its full path: a bare ``w1`` for
            # expert 0 would read as every expert's. So does an ambiguous leaf name after its first holder.
            if short in paths or any(part.isdigit() for part in sub.split(".")):
                short = sub
            paths[short] = sub
            shapes[short] = (out_f, in_f)
            if n_exp:
                experts[short] = n_exp
            if len(held[sub]) < len(per_layer):
                layers[short] = tuple(held[sub])
        if not paths:
            raise SpecError(f"architecture {type(model).__name__}: no nn.Linear projections in its layers")
        adapter = cls("generic", (), best_path, paths, expert_counts=experts or None, tensor_layers=layers or None)
        object.__setattr__(adapter, "_shapes", shapes)
        object.__setattr__(adapter, "_num_layers", len(best_list))
        return adapter

    @classmethod
    def from_config(cls, config: Any) -> GenericAdapter | None:
        """Read off an empty model of ``config`` on the meta device (no weights, ~0.1 s for 7B); ``None`` if
        transformers cannot build this architecture."""
        key = _config_key(config)
        if key in _BUILT_ADAPTERS:
            return _BUILT_ADAPTERS[key]
        adapter = None
        model = _meta_model(config)
        if model is not None:
            try:
                adapter = cls.from_model(model)
            except SpecError:
                adapter = None
        if adapter is not None:
            head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            object.__setattr__(adapter, "_param_count", sum(p.numel() for p in model.parameters()))
            object.__setattr__(adapter, "head_params", int(head.weight.numel()) if head is not None else 0)
        if len(_BUILT_ADAPTERS) >= 32:
            _BUILT_ADAPTERS.clear()
        _BUILT_ADAPTERS[key] = adapter
        return adapter

    def num_layers(self, config: Any) -> int:
        return self._num_layers


_BUILT_ADAPTERS: dict[str, GenericAdapter | None] = {}


def _decoder_layer_list(model: Any) -> tuple[str | None, Any]:
    """(path, list) of the decoder layers: among the ``nn.ModuleList``s that no other list holds, the one as long
    as the config's layer count, else the longest.

    Only outermost lists: mixture-of-experts blocks that keep their experts in a list (transformers 4, remote code
    such as DeepSeek's) nest one per layer, often longer than the layer list (64 experts in 16 layers). The layer
    count picks the language model's list beside a vision tower's.
    """
    import torch.nn as nn

    config = getattr(model, "config", None)
    wanted = config_value(text_config(config), "num_hidden_layers", "n_layer", "num_layers") if config is not None else None
    lists = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList) and len(mod) > 0]
    outer = [(name, mod) for name, mod in lists if not any(name.startswith(other + ".") for other, _ in lists)]
    if not outer:
        return None, None
    matching = [(name, mod) for name, mod in outer if len(mod) == wanted]
    return max(matching or outer, key=lambda item: len(item[1]))


def config_expert_count(config: Any) -> int | None:
    """How many routed experts a mixture-of-experts config names (None: none, or no config)."""
    if config is None:
        return None
    n = config_value(text_config(config), "num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 1 else None


# nn.Linear subclasses with a forward of their own that computes x W^T + b all the same: a LowRankLinear may stand
# in for them. Any other subclass with its own forward (Llama 4's router returns (scores, logits), DeepSeek-V4's
# grouped linear is block-diagonal) is not a projection this package can replace.
_LINEAR_SUBCLASSES = frozenset({"transformers.models.falcon.modeling_falcon.FalconLinear"})  # matmul, then + bias


def _is_plain_linear(module: Any) -> bool:
    import torch.nn as nn

    cls = type(module)
    return isinstance(module, nn.Linear) and (cls.forward is nn.Linear.forward or f"{cls.__module__}.{cls.__qualname__}" in _LINEAR_SUBCLASSES)


_ROUTER_NAMES = frozenset({"gate", "gating", "wg"})  # leaf or holder names that score experts (with "router")


def _is_router(layer: Any, sub: str, out_features: int, num_experts: int | None, expert_counts: dict[str, set[int]]) -> bool:
    """Whether the linear at ``sub`` in ``layer`` scores experts: rank-r routing moves every token's choice of experts,
    and a router is a sliver of the layer's parameters, so it is never offered."""
    parts = sub.split(".")
    parent = ".".join(parts[:-1])
    if out_features > 1 and out_features in expert_counts.get(parent, ()):  # one column per expert beside it (PhiMoE)
        return True
    # inside a router: JetMoE's router.layer, AFMoE's router.gate, LongCat's router.classifier, Zaya's ZayaRouter
    # (mlp.gate). Not "gating" in a class name: Moshi's MoshiGatingMLP is a gated MLP.
    holders = [layer.get_submodule(".".join(parts[:i])) for i in range(1, len(parts))]
    if any("router" in p.lower() for p in parts[:-1]) or any("router" in type(h).__name__.lower() for h in holders):
        return True
    # named as a gate of the config's experts: transformers 4's Mixtral/Qwen2-MoE mlp.gate, Hunyuan's gate.wg
    named = any(p.lower() in _ROUTER_NAMES or "router" in p.lower() for p in parts)
    return named and out_features == num_experts


def _layer_projections(layer: Any, num_experts: int | None = None) -> dict[str, tuple[int, int, int]]:
    """Sub path -> (experts, out, in) of a layer's linears (0 experts) and stacked expert projections.

    ``num_experts``: the config's routed experts, which tells a router named as one (``gate``, ``router``) from a
    projection. A peft adapter's wrapper counts as the linear it wraps, under the wrapper's name; the adapter's own
    matrices (``lora_A``, ``lora_B``, ...) are never offered. An already decomposed linear keeps its name and shape,
    so a second decomposition of it is refused by name rather than offered something else."""
    import torch.nn as nn

    from .modules import LowRankLinear, expert_projection_names, is_experts_module

    def expert_count(module: Any) -> int | None:  # a list of experts, or transformers' stacked experts module
        if isinstance(module, nn.ModuleList):
            return len(module)
        if is_experts_module(module):
            shapes = [getattr(module, name).shape for name in expert_projection_names(module) if getattr(module, name, None) is not None]
            return int(shapes[0][0]) if shapes and len(shapes[0]) == 3 else None
        return None

    expert_counts: dict[str, set[int]] = {}  # holder path -> the expert counts of its children
    for parent, holder in layer.named_modules():
        counts = {n for child in holder.children() if (n := expert_count(child)) is not None}
        if counts:
            expert_counts[parent] = counts
    found: dict[str, tuple[int, int, int]] = {}
    wrapped: list[str] = []  # peft wrappers: nothing inside one is a projection of its own
    for sub, m in layer.named_modules():
        if any(sub.startswith(w + ".") for w in wrapped):
            continue
        if isinstance(getattr(m, "base_layer", None), nn.Module):  # a peft tuner layer stands for the layer it wraps
            wrapped.append(sub)
            m = m.base_layer
        if _is_plain_linear(m) or isinstance(m, LowRankLinear):
            if not _is_router(layer, sub, m.out_features, num_experts, expert_counts):
                found[sub] = (0, m.out_features, m.in_features)
        elif is_experts_module(m) and sub not in wrapped:  # wrapped experts: decompose_model cannot reach their parameters
            for name in expert_projection_names(m):
                w = getattr(m, name, None)
                if w is not None and len(w.shape) == 3:
                    n_exp, a, b = w.shape
                    found[f"{sub}.{name}"] = (int(n_exp), int(b), int(a)) if m.is_transposed else (int(n_exp), int(a), int(b))
    return found


def _config_key(config: Any) -> str:
    import json

    d = dict(config) if isinstance(config, Mapping) else config.to_dict()
    return json.dumps({k: v for k, v in d.items() if not k.startswith("_")}, sort_keys=True, default=str)


def _meta_model(config: Any) -> Any:
    """An empty CausalLM of ``config`` on the meta device, or ``None`` (unknown type, remote code, bad config)."""
    import torch
    import transformers

    try:
        with _quiet_transformers():
            if isinstance(config, Mapping):
                fields = {k: v for k, v in config.items() if not k.startswith("_") and k != "model_type"}
                config = transformers.AutoConfig.for_model(str(config.get("model_type", "")), **fields)
            with torch.device("meta"):
                return transformers.AutoModelForCausalLM.from_config(config)
    except Exception:  # any failure only means: validate after load, as before
        return None


def experts_per_token(config: Any) -> int | None:
    """How many experts each token is routed to (top-k) in a mixture-of-experts config; None if it names none."""
    k = config_value(text_config(config), "num_experts_per_tok", "moe_topk", "moe_top_k", "top_k")
    return int(k) if isinstance(k, int) and not isinstance(k, bool) and k > 0 else None


def config_side_adapter(config: Any) -> ArchitectureAdapter | None:
    """The adapter for a config before any weights load: a known family's, else one read off an empty model of
    the config (any architecture transformers can build), else ``None``."""
    return adapter_for_config(config) or GenericAdapter.from_config(config)


def model_type_of(config: Any) -> str:
    return str(config_value(config, "model_type", default="")).lower()


def adapter_for_config(config: Any) -> ArchitectureAdapter | None:
    """The adapter for a config, or ``None`` when the architecture is unknown (generic fallback)."""
    mt = model_type_of(config)
    for a in ADAPTERS:
        if mt in a.model_types:
            return a
    return None


def adapter_for_model(model: Any) -> ArchitectureAdapter:
    adapter = adapter_for_config(model.config)
    if adapter is not None:
        try:
            adapter.layers(model)
            return adapter
        except AttributeError:
            pass
    return GenericAdapter.from_model(model)


def known_architectures() -> list[str]:
    return sorted({mt for a in ADAPTERS for mt in a.model_types})
