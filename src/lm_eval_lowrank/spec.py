"""The decomposition spec: parsing and validation of what to decompose and how.

One value syntax serves the lm-eval ``model_args`` string, the CLI options and the Python API:

- ``rank``: ``8``; per-tensor overrides with ``tensor:rank`` joined by ``|``,
  e.g. ``rank=8|q:4|gate:32`` (default 8, q at 4, gate at 32) or ``rank=q:8|gate:32``
  (no default: only q and gate are decomposed unless ``tensors`` says otherwise).
- ``layers``: 1-based. ``3|18|32``, ranges ``3-10``, stepped ranges ``3-30:3``, mixes
  ``1-4|10``, ``all``; an int (``layers=18`` arrives from lm-eval's CLI as an int).
- ``tensors``: short names joined by ``|`` (``q|k|v|o|gate|up|down``) or ``all``.

Everything here is pure Python (torch is imported only to name dtypes), so bad input fails before any weight loads.
"""

from __future__ import annotations

import collections

import fnmatch
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

METHODS = ("tucker", "rom", "whiten", "asvd", "fwsvd", "fwhiten")
CALIBRATED_METHODS = ("rom", "whiten", "asvd", "fwsvd", "fwhiten")  # they read calibration data (calib= defaults to wikitext_local)
GRADIENT_METHODS = ("fwsvd", "fwhiten")  # their statistics include gradients of the LM loss (the rows' Fisher sums)
GRADIENT_ONLY_METHODS = ("fwsvd",)  # and nothing else: no layer's activations
REFERENCE_METHODS = ("whiten", "fwhiten")  # they fit the dense model's outputs too: calib_target is theirs
METHOD_OPTIONS = {"asvd_alpha": "asvd", "asvd_stat": "asvd"}  # an option of one method -> that method (refused with any other)
ALLOCATORS = ("uniform", "tail", "sensitivity", "output_error", "fisher")
CALIBRATED_ALLOCATORS = ("sensitivity", "output_error", "fisher")  # they read calibration data, whatever the method
GRADIENT_ALLOCATORS = ("fisher",)  # and the gradient pass (the rows' Fisher sums), whatever the method
LAYOUTS = ("auto", "folded", "tucker")
ASVD_STATS = ("mean_abs", "rms")  # method=asvd: how a channel's size is measured
SOLVERS = ("auto", "exact", "gram", "krylov", "randomized")
# calib_target names: the weight of the dense model's outputs in what each layer is fitted to.
CALIB_TARGETS = {"compressed": 0.0, "dense": 1.0}
CALIB_TARGET_SYNTAX = "valid: compressed, dense, or the weight of the dense model's outputs in the target, 0..1 (e.g. 0.25)"

# The arguments this package owns; everything else in model_args goes to HFLM unchanged.
SPEC_KEYS = (
    "method",
    "rank",
    "layers",
    "tensors",
    "budget",
    "allocator",
    "rank_multiple",
    "layout",
    "solver",
    "solver_tol",
    "seed",
    "calib",
    "calib_n",
    "calib_len",
    "calib_batch",
    "grad_batch",
    "grad_checkpoint",
    "calib_target",
    "calib_staged",
    "cache",
    "asvd_alpha",
    "asvd_stat",
)
# Arguments once taken that no longer mean anything: refused with the reason, not passed on to HFLM.
REMOVED_KEYS = {
    "hooi_iters": "each decomposed weight is 2-D, and its Tucker-2 is the truncated SVD, which HOOI reaches without iterating; leave it out",
}
# The spec fields that change the factors, besides the ranks, targets and layout that a plan carries: the keys of
# the decomposition cache, and of calibration statistics taken after earlier layers were decomposed. Derived, so
# that a new argument keys the caches unless it is named here as keyed elsewhere or without effect.
# grad_batch changes the Fisher sums only at round-off (the same sums, batched otherwise); grad_checkpoint not at all.
FACTOR_FIELDS = tuple(k for k in SPEC_KEYS if k not in ("rank", "layers", "tensors", "layout", "cache", "grad_batch", "grad_checkpoint"))


class SpecError(ValueError):
    """A malformed decomposition argument. The message is one line naming the argument."""


def _fail(arg: str, value: Any, valid: str) -> SpecError:
    return SpecError(f"{arg}={value!r} is invalid: {valid}")


def _as_float_in(arg: str, value: Any, ok: Callable[[float], bool], valid: str) -> float:
    """``value`` as a float that ``ok`` accepts (never a bool), else the one-line error naming ``arg``."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise _fail(arg, value, valid) from None
    if isinstance(value, bool) or not ok(x):
        raise _fail(arg, value, valid)
    return x


def _as_int(arg: str, text: Any, valid: str) -> int:
    if isinstance(text, bool):
        raise _fail(arg, text, valid)
    if isinstance(text, int):
        return text
    if isinstance(text, float) and text.is_integer():
        return int(text)
    s = str(text).strip()
    if not re.fullmatch(r"[+-]?\d+", s):
        raise _fail(arg, text, valid)
    return int(s)


def _as_bool(arg: str, value: Any, valid: str = "expected true or false") -> bool:
    if isinstance(value, bool):
        return value
    s = str(value).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise _fail(arg, value, valid)


def _split(value: Any) -> list[str]:
    if isinstance(value, Mapping):  # from Python: rank={"q": 4, "gate": 32}, "*" for the default
        parts = [str(v) if str(k).strip() in ("*", "default") else f"{k}:{v}" for k, v in value.items()]
    elif isinstance(value, (set, frozenset)):
        parts = sorted(str(v) for v in value)  # a stable order: the spec's text is part of cache keys
    elif isinstance(value, (list, tuple, range)):
        parts = [str(v) for v in value]
    else:
        parts = str(value).replace(",", "|").split("|")
    return [p.strip() for p in parts]


MAX_LAYER = 100_000  # far past any model; bounds what a range may expand to
LAYERS_SYNTAX = "1-based layer numbers joined by '|' (e.g. 3|18|32), ranges a-b or a-b:step, or 'all'"


def parse_layers(value: Any) -> tuple[int, ...] | None:
    """Parse a layer selection into sorted 1-based layer numbers; ``None`` means all layers."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise _fail("layers", value, LAYERS_SYNTAX)
    if isinstance(value, float) and value.is_integer():  # lm-eval's command line reads layers=+2 as 2.0, -1 as -1.0
        value = int(value)
    if isinstance(value, int):
        parts = [str(value)]
    else:
        if isinstance(value, str) and value.strip().lower() == "all":
            return None
        parts = _split(value)
    if not parts or any(p == "" for p in parts):
        raise _fail("layers", value, "empty entry; " + LAYERS_SYNTAX)
    out: list[int] = []
    for part in parts:
        m = re.fullmatch(r"([+-]?\d+)(?:-(\d+)(?::(\d+))?)?", part)
        if not m:
            raise _fail("layers", value, f"cannot parse {part!r}; " + LAYERS_SYNTAX)
        start = int(m.group(1))
        if m.group(2) is None:
            out.append(start)
            continue
        stop, step = int(m.group(2)), int(m.group(3) or 1)
        if step < 1 or stop < start:
            raise _fail("layers", value, f"range {part!r} must have start <= end and step >= 1")
        if stop > MAX_LAYER:  # before expanding it: 1-300000000 ran out of memory
            raise _fail("layers", value, f"layer {stop} is out of range; no model has more than {MAX_LAYER} decoder layers")
        out.extend(range(start, stop + 1, step))
    for layer in out:
        if layer < 1:
            raise _fail("layers", value, f"layer {layer} is out of range; layers are 1-based (the first decoder layer is 1)")
    dupes = sorted(layer for layer, n in collections.Counter(out).items() if n > 1)  # linear: 1-30000 took 23 s
    if dupes:
        raise _fail("layers", value, f"duplicate layer(s) {dupes}")
    return tuple(sorted(out))


def parse_calib_target(value: Any) -> float:
    """``compressed`` (0), ``dense`` (1) or a weight in [0, 1] of the dense model's outputs in the target."""
    if isinstance(value, str) and value.strip().lower() in CALIB_TARGETS:
        return CALIB_TARGETS[value.strip().lower()]
    if isinstance(value, bool):
        raise _fail("calib_target", value, CALIB_TARGET_SYNTAX)
    try:
        w = float(value)
    except (TypeError, ValueError):
        raise _fail("calib_target", value, CALIB_TARGET_SYNTAX) from None
    if not 0.0 <= w <= 1.0:  # also refuses nan
        raise _fail("calib_target", value, CALIB_TARGET_SYNTAX)
    return w


def format_layers(layers: Iterable[int] | None) -> str:
    return "all" if layers is None else "|".join(str(x) for x in layers)


def format_layer_ranges(layers: Iterable[int] | None) -> str:
    """As :func:`format_layers`, with runs of three or more consecutive layers as a-b (for messages: 3-31 typed
    by a user came back as 29 numbers)."""
    if layers is None:
        return "all"
    runs: list[list[int]] = []
    for x in layers:
        if runs and x == runs[-1][-1] + 1:
            runs[-1].append(x)
        else:
            runs.append([x])
    return "|".join(f"{r[0]}-{r[-1]}" if len(r) >= 3 else "|".join(map(str, r)) for r in runs)


def parse_tensors(value: Any) -> tuple[str, ...] | None:
    """Parse tensor short names; ``None`` means every projection of the architecture."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lower() == "all":
        return None
    parts = _split(value)
    if not parts or any(p == "" for p in parts):
        raise _fail("tensors", value, "expected short names joined by '|' (e.g. q|k|v|o|gate|up|down) or 'all'")
    dupes = sorted({x for x in parts if parts.count(x) > 1})
    if dupes:
        raise _fail("tensors", value, f"duplicate tensor name(s) {dupes}")
    return tuple(parts)


def _is_pattern(name: str) -> bool:
    return any(c in name for c in "*?[")


def tensor_matches(name: str, available: Iterable[str]) -> tuple[str, ...]:
    """The available tensor names that ``name`` (a name or a shell-style pattern) stands for."""
    available = tuple(available)
    if name in available:
        return (name,)
    return tuple(t for t in available if fnmatch.fnmatchcase(t, name)) if _is_pattern(name) else ()


def expand_tensor_names(names: Iterable[str], available: Iterable[str], arg: str = "tensors") -> tuple[str, ...]:
    """Names and patterns expanded to the tensor names they stand for, in the order given; a name or pattern
    that matches nothing raises, naming ``arg`` and the valid names."""
    available = tuple(available)
    out: list[str] = []
    for name in names:
        found = tensor_matches(name, available)
        if not found:
            what = "matches no tensor" if _is_pattern(name) else "unknown tensor"
            raise SpecError(f"{arg}: {what} {name!r} for this architecture; valid: {'|'.join(available)}")
        out += [t for t in found if t not in out]
    return tuple(out)


RANK_SYNTAX = "an int >= 1, optionally with per-tensor overrides like 8|q:4|gate:32"


def _rank_entry(value: Any, part: str) -> int:
    """One entry's rank; an error names the whole argument, not the fragment."""
    try:
        return _as_int("rank", part, RANK_SYNTAX)
    except SpecError:
        raise _fail("rank", value, f"cannot parse {part.strip()!r} as a rank; " + RANK_SYNTAX) from None


def parse_rank(value: Any) -> tuple[int | None, dict[str, int]]:
    """Parse ``rank`` into (default rank, per-tensor overrides)."""
    if value is None:
        return None, {}
    if isinstance(value, bool):
        raise _fail("rank", value, RANK_SYNTAX)
    if isinstance(value, (int, float)):
        r = _as_int("rank", value, RANK_SYNTAX)
        if r < 1:
            raise _fail("rank", r, "must be >= 1 (" + RANK_SYNTAX + ")")  # r: lm_eval's command line reads -1 as -1.0
        return r, {}
    default: int | None = None
    overrides: dict[str, int] = {}
    for part in _split(value):
        if part == "":
            raise _fail("rank", value, "empty entry; " + RANK_SYNTAX)
        if ":" in part:
            name, _, num = part.partition(":")
            name = name.strip()
            r = _rank_entry(value, num)
            if not name:
                raise _fail("rank", value, "missing tensor name before ':'; " + RANK_SYNTAX)
            if name in overrides:
                raise _fail("rank", value, f"tensor {name!r} given twice")
            overrides[name] = r
        else:
            if default is not None:
                raise _fail("rank", value, "more than one default rank; " + RANK_SYNTAX)
            r = _rank_entry(value, part)
            default = r
        if r < 1:
            raise _fail("rank", value, "every rank must be >= 1 (" + RANK_SYNTAX + ")")
    return default, overrides


def format_rank(default: int | None, overrides: Mapping[str, int]) -> str:
    parts = [] if default is None else [str(default)]
    parts += [f"{k}:{v}" for k, v in overrides.items()]
    return "|".join(parts)


def breakeven_rank(out_features: int, in_features: int, layout: str = "folded") -> int:
    """The smallest rank that saves no parameters for an out x in matrix.

    Folded (two factors) stores r(m+n); Tucker-2 (three factors) stores r(m+n)+r².
    """
    m, n = out_features, in_features
    if layout == "tucker":
        # r² + r(m+n) - mn >= 0
        r = (-(m + n) + math.sqrt((m + n) ** 2 + 4 * m * n)) / 2
        return max(1, math.ceil(r - 1e-9))
    return max(1, math.ceil(m * n / (m + n) - 1e-9))


@dataclass(frozen=True)
class DecompositionSpec:
    """What to decompose (layers x tensors), to which rank or budget, and by which method."""

    method: str = "tucker"
    rank: int | None = None
    rank_overrides: dict[str, int] = field(default_factory=dict)
    layers: tuple[int, ...] | None = None  # 1-based; None = all
    tensors: tuple[str, ...] | None = None  # None = all of the architecture
    budget: float | None = None  # fraction of the targeted parameters to keep
    allocator: str = "uniform"
    rank_multiple: int = 1
    layout: str = "auto"
    solver: str = "auto"
    # The Krylov solver stops once each kept singular value is certified within this relative
    # error (methods.tucker.KRYLOV_TOL); the JSON reports the worst bound reached.
    solver_tol: float = 0.01
    seed: int = 0
    calib: str | None = None
    calib_n: int = 128
    calib_len: int = 128
    calib_batch: int = 8
    # Sequences per forward and backward of the gradient pass (fwsvd, fwhiten, allocator=fisher). The backward holds
    # every layer's activations, so memory grows with it. On the CPU 2 was 1.3-1.5x faster than 1 (which takes each
    # weight's gradient, the least memory) on SmolLM2 and 2.4x at Llama-2-7B's shapes; 4 and 8 little faster.
    grad_batch: int = 2
    # The gradient pass keeps only each decoder layer's input and recomputes the layer in the backward: the graph
    # holds one layer's activations instead of every layer's, for ~1.3x the pass's time (the same sums, bit for bit).
    # None (auto): only when the first batch would hold more than half the memory free when the pass starts.
    grad_checkpoint: bool | None = None
    # What each layer is fitted to: weight of the dense model's outputs (error correction) against the
    # compressed model's own (0 = compressed, 1 = dense); 0.25 measured best on SmolLM2 (README).
    calib_target: float = 0.25
    calib_staged: bool = True  # calibrate within a layer in forward order: q,k,v -> o -> gate,up -> down
    cache: bool = True
    asvd_alpha: float = 0.5  # method=asvd: input channels scaled by their size ** asvd_alpha (ASVD's paper: 0.5)
    asvd_stat: str = "mean_abs"  # method=asvd: a channel's size, ASVD's mean |x| or the RMS (covariance diagonal)

    # -- construction -------------------------------------------------------------
    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> DecompositionSpec:
        """Build from a mapping of raw values (model_args, CLI options, Python)."""
        removed = [k for k in args if k in REMOVED_KEYS]
        if removed:
            raise SpecError(f"{removed[0]} is not an argument any more: {REMOVED_KEYS[removed[0]]}")
        unknown = set(args) - set(SPEC_KEYS)
        if unknown:
            raise SpecError(f"unknown decomposition argument(s) {sorted(unknown)}; valid: {', '.join(SPEC_KEYS)}")
        kw: dict[str, Any] = {}
        if "method" in args and args["method"] is not None:
            method = str(args["method"]).strip().lower()
            if method not in METHODS:
                raise _fail("method", args["method"], "valid methods: " + ", ".join(METHODS))
            kw["method"] = method
        if "rank" in args:
            kw["rank"], kw["rank_overrides"] = parse_rank(args["rank"])
        if "layers" in args:
            kw["layers"] = parse_layers(args["layers"])
        if "tensors" in args:
            kw["tensors"] = parse_tensors(args["tensors"])
        if args.get("budget") is not None:
            kw["budget"] = _as_float_in("budget", args["budget"], lambda x: 0.0 < x < 1.0, "expected the fraction of parameters to keep, 0 < budget < 1")
        if args.get("solver_tol") is not None:
            valid = "expected the certified relative error of each kept singular value (Krylov solver), 0 < solver_tol < 1"
            kw["solver_tol"] = _as_float_in("solver_tol", args["solver_tol"], lambda x: 0.0 < x < 1.0, valid)
        for key, choices in (("allocator", ALLOCATORS), ("layout", LAYOUTS), ("solver", SOLVERS), ("asvd_stat", ASVD_STATS)):
            if args.get(key) is not None:
                v = str(args[key]).strip().lower()
                if v not in choices:
                    raise _fail(key, args[key], "valid: " + ", ".join(choices))
                kw[key] = v
        for key, lo in (("rank_multiple", 1), ("calib_n", 1), ("calib_len", 2), ("calib_batch", 1), ("grad_batch", 1), ("seed", 0)):
            if args.get(key) is not None:
                v = _as_int(key, args[key], f"expected an int >= {lo}")
                if v < lo:
                    # lm_eval's command line reads -1 as -1.0: a float is quoted as the int it stands for
                    raise _fail(key, v if isinstance(args[key], float) else args[key], f"expected an int >= {lo}")
                kw[key] = v
        if args.get("calib") is not None:
            kw["calib"] = str(args["calib"]).strip()
        if args.get("calib_target") is not None:
            kw["calib_target"] = parse_calib_target(args["calib_target"])
        if args.get("asvd_alpha") is not None:
            valid = "expected the exponent of the input channels' scale, 0..1 (0: plain SVD; e.g. 0.5)"
            alpha = _as_float_in("asvd_alpha", args["asvd_alpha"], lambda x: 0.0 <= x <= 1.0, valid)
            kw["asvd_alpha"] = alpha
        for option, owner in METHOD_OPTIONS.items():
            if option in kw and kw.get("method", "tucker") != owner:
                raise _fail(option, args[option], f"it applies to method={owner} only, not method={kw.get('method', 'tucker')}")
        for key in ("cache", "calib_staged"):
            if args.get(key) is not None:
                kw[key] = _as_bool(key, args[key])
        if args.get("grad_checkpoint") is not None:
            v = args["grad_checkpoint"]
            auto = isinstance(v, str) and v.strip().lower() == "auto"
            kw["grad_checkpoint"] = None if auto else _as_bool("grad_checkpoint", v, "expected auto, true or false")
        overrides_only = kw.get("rank") is None and bool(kw.get("rank_overrides"))
        if overrides_only and isinstance(args.get("tensors"), str) and args["tensors"].strip().lower() == "all":
            # "all" parses to no selection, which with overrides alone means "just the overridden tensors"
            raise _fail(
                "tensors", args["tensors"],
                f"rank={args['rank']!r} gives ranks for {'|'.join(kw['rank_overrides'])} only: give a default rank "
                f"(e.g. rank=8|{'|'.join(f'{k}:{v}' for k, v in kw['rank_overrides'].items())}), or leave tensors out to decompose just those",
            )  # fmt: skip
        if (kw.get("rank") is not None or kw.get("rank_overrides")) and kw.get("budget") is None:
            stray = [k for k in ("allocator", "rank_multiple") if args.get(k) is not None]
            if stray:  # recorded in the JSON as if they had placed the ranks
                raise _fail(stray[0], args[stray[0]], "it applies to budget=F only; with rank= the ranks are given")
        spec = cls(**kw)
        spec._check_consistency()
        spec._warn_unused({k for k, v in args.items() if v is not None})
        return spec

    def _warn_unused(self, given: set[str]) -> None:
        """Arguments that change nothing here, said on stderr (not refused: a sweep passes the same extra arguments to
        its dense baseline and to every method)."""
        for names, why in self.unused_args(given):
            print(f"[lm-eval-lowrank] warning: {', '.join(names)} unused: {why}", file=sys.stderr)

    def unused_args(self, given: Iterable[str] | None = None) -> list[tuple[list[str], str]]:
        """(names, why) of the arguments set away from their defaults that change nothing in this decomposition;
        ``given``: only among these names (default: every field)."""
        default = DecompositionSpec()
        names = set(default.__dataclass_fields__) if given is None else set(given)
        changed = {k for k in names if k in default.__dataclass_fields__ and getattr(self, k) != getattr(default, k)}  # to_dict() round trips are quiet
        if self.is_noop:
            unused = sorted(changed - {"cache"})
            return [(unused, "without rank= or budget= nothing is decomposed (the model runs dense)")] if unused else []
        notes = []
        calib = [] if self.reads_calibration else sorted(changed & {"calib", "calib_n", "calib_len", "calib_batch", "calib_target", "calib_staged"})
        if calib:
            notes.append((calib, f"method={self.method} reads no calibration data"))
        elif "calib_target" in changed and self.method not in REFERENCE_METHODS:
            notes.append((["calib_target"], f"method={self.method} fits the compressed model's own outputs (calib_target is {' and '.join(REFERENCE_METHODS)}'s)"))
        gradients = self.method in GRADIENT_METHODS or (self.budget is not None and self.allocator in GRADIENT_ALLOCATORS)
        grad = [] if gradients else sorted(changed & {"grad_batch", "grad_checkpoint"})
        if grad:
            notes.append((grad, "no gradient pass runs (method fwsvd/fwhiten or allocator=fisher)"))
        # solver_tol is Krylov's (auto may pick it); seed is the random solvers' and the calibration windows'
        solver = sorted(changed & ({"solver_tol"} if self.solver in ("exact", "gram", "randomized") else set()))
        solver += ["seed"] if "seed" in changed and self.solver in ("exact", "gram") and not self.reads_calibration else []
        if solver:
            notes.append((solver, f"solver={self.solver} does not read {'it' if len(solver) == 1 else 'them'}"))
        return notes

    def effective(self) -> DecompositionSpec:
        """This spec with its unused arguments at their defaults: what the factors depend on (the cache key), so
        that an argument that changes nothing does not miss the cache."""
        default = DecompositionSpec()
        unused = {name for names, _ in self.unused_args() for name in names}
        return replace(self, **{k: getattr(default, k) for k in unused}) if unused and not self.is_noop else self

    def _check_consistency(self) -> None:
        if self.budget is None and self.rank is None and not self.rank_overrides:
            if self.layers is not None or self.tensors is not None:
                raise SpecError("rank is missing: give rank=N (or rank=q:N|...) or budget=F with layers/tensors")
        if self.budget is not None and (self.rank is not None or self.rank_overrides):
            raise SpecError(f"rank={format_rank(self.rank, self.rank_overrides)!r} and budget={self.budget} exclude each other; give one")
        if self.method in CALIBRATED_METHODS and self.calib is None:
            object.__setattr__(self, "calib", "wikitext_local")
        if self.method in GRADIENT_METHODS and self.budget is not None and self.allocator == "output_error":
            raise SpecError(f"allocator='output_error' is invalid with method={self.method!r}: its error weighs the outputs by their Fisher information, which that proxy does not; valid: uniform, tail, sensitivity, fisher (the loss-weighted one)")

    @property
    def reads_calibration(self) -> bool:
        """Whether anything reads calibration data: the method, or a budget's measuring allocator."""
        return self.method in CALIBRATED_METHODS or self.budget is not None and self.allocator in CALIBRATED_ALLOCATORS

    @property
    def is_noop(self) -> bool:
        """True when nothing is to be decomposed (hf-tucker then behaves as plain hf)."""
        return self.budget is None and self.rank is None and not self.rank_overrides

    def method_options(self) -> dict[str, Any]:
        """The spec's options that its method takes, beyond the solver's (passed to every call of the method)."""
        return {k: getattr(self, k) for k, owner in METHOD_OPTIONS.items() if owner == self.method}

    def selected_tensors(self, available: Iterable[str]) -> tuple[str, ...]:
        """The tensor short names to decompose, checked against what the architecture has. A name with a shell-style
        wildcard (``*.w1``, ``block_sparse_moe.experts.*``) stands for every name it matches: experts kept in a list
        are named one by one (``block_sparse_moe.experts.3.w1``)."""
        available = tuple(available)
        named = expand_tensor_names(self.tensors or (), available, "tensors")
        overridden = expand_tensor_names(self.rank_overrides, available, "rank")
        if self.tensors is not None:
            chosen = named
            unused = [k for k in self.rank_overrides if not any(t == k or (_is_pattern(k) and fnmatch.fnmatchcase(t, k)) for t in chosen)]
            if unused:  # a rank that would silently not apply
                raise SpecError(
                    f"rank: {'|'.join(unused)} given a rank but not selected by tensors={'|'.join(self.tensors)}; add it to tensors or drop its rank"
                )
        elif self.rank is None and self.rank_overrides:
            chosen = overridden
        else:
            chosen = available
        if self.budget is None and self.rank is None:
            missing = [t for t in chosen if self._override_for(t) is None]
            if missing:
                raise SpecError(f"rank: no rank for tensor(s) {'|'.join(missing)}; give a default rank (e.g. rank=8|q:4)")
        return chosen

    def _override_for(self, tensor: str) -> int | None:
        """The per-tensor rank: the exact name's, else the first matching pattern's, in the order given."""
        if tensor in self.rank_overrides:
            return self.rank_overrides[tensor]
        return next((r for name, r in self.rank_overrides.items() if _is_pattern(name) and fnmatch.fnmatchcase(tensor, name)), None)

    def rank_for(self, tensor: str) -> int:
        override = self._override_for(tensor)
        if override is not None:
            return override
        if self.rank is None:
            raise SpecError(f"rank: no rank for tensor {tensor!r}")
        return self.rank

    def selected_layers(self, num_layers: int) -> tuple[int, ...]:
        if self.layers is None:
            return tuple(range(1, num_layers + 1))
        bad = [x for x in self.layers if x > num_layers]
        if bad:
            raise SpecError(
                f"layers={format_layer_ranges(self.layers)!r} is invalid: layer {bad[0]} is past the end; "
                f"this model has {num_layers} decoder layers, valid 1..{num_layers}"
            )
        return self.layers

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = format_layers(self.layers)
        # with per-tensor ranks alone and no tensors=, the overridden tensors are the selection, not "all"
        d["tensors"] = ("all" if self.rank is not None or not self.rank_overrides or self.budget is not None else None) if self.tensors is None else "|".join(self.tensors)
        d["rank"] = self.rank if not self.rank_overrides else format_rank(self.rank, self.rank_overrides)
        d.pop("rank_overrides")
        d["grad_checkpoint"] = "auto" if self.grad_checkpoint is None else self.grad_checkpoint
        for option, owner in METHOD_OPTIONS.items():  # another method's option: absent, so that from_args(to_dict()) holds
            if owner != self.method:
                d.pop(option)
        if self.budget is None:  # they place the ranks of a budget only: absent, not recorded as if they had
            d.pop("allocator")
            d.pop("rank_multiple")
        return d

    def with_(self, **changes: Any) -> DecompositionSpec:
        return replace(self, **changes)


def split_model_args(kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split model_args into (ours, the rest for HFLM). ``rank`` collides with HFLM.rank."""
    ours = {k: v for k, v in kwargs.items() if k in SPEC_KEYS or k in REMOVED_KEYS}
    rest = {k: v for k, v in kwargs.items() if k not in ours}
    return ours, rest


# HFLM's dtype arguments, which lm-eval and transformers read by name off torch: a typo raised AttributeError from
# inside from_pretrained, and for softmax_dtype / mixed_precision_dtype only after the weights had loaded.
DTYPE_ARGS = ("dtype", "softmax_dtype", "mixed_precision_dtype")


def _compute_dtype(torch: Any, value: Any) -> bool:
    """A dtype a model can be built and run in: floating point, and not one of the 8/4-bit storage formats
    (``int8`` and ``float8_e4m3fn`` name torch dtypes, but from_pretrained fails on them after a long traceback)."""
    dtype = value if isinstance(value, torch.dtype) else getattr(torch, value, None) if isinstance(value, str) else None
    return isinstance(dtype, torch.dtype) and dtype.is_floating_point and dtype.itemsize >= 2


def check_dtype_args(args: Mapping[str, Any]) -> None:
    """Refuse a dtype argument that names no floating-point torch dtype, before any weights load ("auto" is valid
    for dtype)."""
    import torch

    for key in DTYPE_ARGS:
        value = args.get(key)
        if value is None or (key == "dtype" and value == "auto"):
            continue
        if not _compute_dtype(torch, value):
            auto = "auto, " if key == "dtype" else ""
            raise SpecError(f"{key}={value!r} is invalid: valid {auto}float32, float16, bfloat16, float64 (or half, float, double)")


# Arguments that name a model, tokenizer or adapter: a Hub id ("org/name") or a local path. transformers answers a
# missing local path with "Repo id must use alphanumeric chars ..." (and peft / delta only after the weights load).
PATH_ARGS = ("pretrained", "tokenizer", "peft", "delta")


def _looks_local(value: str) -> bool:
    # A Hub id has at most one "/" and never starts with one, ".", or "~".
    return os.path.isabs(value) or value.startswith((".", "~")) or value.count("/") > 1 or "\\" in value


def check_local_path(arg: str, value: Any) -> None:
    """Refuse ``value`` when it is a local path (not a Hub id) that does not exist, before any weights load."""
    if not isinstance(value, str) or not value or not _looks_local(value) or os.path.exists(value):
        return
    hint = ""
    if value.startswith("~") and os.path.exists(os.path.expanduser(value)):
        hint = f" ('~' is not expanded inside quotes: write {os.path.expanduser(value)!r})"
    raise SpecError(f"{arg}={value!r} is invalid: no such local file or folder{hint}; give an existing path or a Hub id such as org/name")


def check_local_paths(args: Mapping[str, Any]) -> None:
    """check_local_path for each of ``PATH_ARGS`` in ``args``."""
    for key in PATH_ARGS:
        check_local_path(key, args.get(key))


BATCH_SIZE_SYNTAX = "an int >= 1, auto, or auto:N (re-detect the batch size N times)"


def check_batch_size(value: Any) -> None:
    """A one-line SpecError unless ``value`` is a batch size lm-eval's HFLM takes, checked before any model loads
    (HFLM reads it only after the weights load: ``int('abc')``)."""
    match = re.fullmatch(r"(\d+)|auto(?::(\d+))?", str(value))  # as HFLM reads it: lower-case, no spaces
    count = match and (match.group(1) or match.group(2))  # the size, or auto's N (None: plain auto)
    if isinstance(value, bool) or match is None or (count is not None and int(count) < 1):
        raise SpecError(f"batch_size={value!r} is invalid: expected {BATCH_SIZE_SYNTAX}")


def check_model_folder(pretrained: Any, args: Mapping[str, Any]) -> None:
    """Refuse an empty ``pretrained``, or a local one that holds no model, before transformers does it in a long
    traceback ("Repo id must use alphanumeric chars", "Unrecognized model in ...", "not a valid JSON file")."""
    if not isinstance(pretrained, str):
        return
    if not pretrained.strip():
        raise SpecError("pretrained='' is invalid: give a model folder or a Hub id such as org/name")
    if args.get("gguf_file") or not os.path.exists(pretrained):
        return  # a GGUF file names its own weights; a Hub id is read by transformers
    folder = os.path.join(pretrained, str(args.get("subfolder") or ""))
    if os.path.isfile(pretrained):
        raise SpecError(f"pretrained={pretrained!r} is invalid: it is a file; give the model's folder (the one holding config.json)")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        if args.get("subfolder"):
            raise SpecError(f"pretrained={pretrained!r}, subfolder={args['subfolder']!r}: no model config there (no config.json in {folder!r})")
        raise SpecError(f"pretrained={pretrained!r} is invalid: it holds no config.json, so it is not a model folder")


def parse_model_args(text: str) -> dict[str, Any]:
    """Parse a ``k=v,k=v`` model_args string the way lm-eval does (ints and floats typed); a key given twice is
    refused (lm-eval would keep the last value)."""
    out: dict[str, Any] = {}
    if not text:
        return out
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise SpecError(f"model_args: {item!r} is not key=value")
        k, _, v = item.partition("=")
        k = k.strip()
        if k in out:
            raise SpecError(f"model_args: {k} is given twice ({out[k]!r} and {_coerce(v.strip())!r}); give it once")
        out[k] = _coerce(v.strip())
    return out


def _coerce(v: str) -> Any:
    if v.lower() == "true":
        return True
    if v.lower() == "false":
        return False
    if v.lower() == "none":
        return None
    if re.fullmatch(r"[+-]?\d+", v):
        return int(v)
    try:
        return float(v)
    except ValueError:
        return v
