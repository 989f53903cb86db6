"""``hf-tucker``: lm-eval's HFLM with decomposition on load and efficiency measurement.

Following lm-eval's ``hf_steered``: a small HFLM subclass that changes the model after
``super().__init__`` and wraps the forward calls. With no ``rank``/``budget`` it is plain
``hf`` plus measurement (the dense baseline of every comparison).

All figures land in the results JSON under ``config["lowrank"]`` via ``get_model_info``.
"""

from __future__ import annotations

import math
import os
import re
import sys
import time
import weakref
from types import TracebackType
from typing import Any

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from .api import compress_model, validate_against_config, versions
from .decompose import ProcessShard, factors_digest
from .measure import Meter, aggregate
from .modules import experts_forward_path, hook_execution_devices
from .spec import SPEC_KEYS, DecompositionSpec, SpecError, _as_bool, _as_float_in, _as_int, check_batch_size, check_dtype_args, check_local_paths, check_model_folder, split_model_args

RESULTS_KEY = "lowrank"
SCHEMA_VERSION = 1


def _load_config(pretrained: Any, kwargs: dict[str, Any]) -> Any:
    if not isinstance(pretrained, str):
        return getattr(pretrained, "config", None)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            pretrained,
            revision=kwargs.get("revision") or "main",
            subfolder=kwargs.get("subfolder") or "",
            trust_remote_code=bool(kwargs.get("trust_remote_code", False)),
            gguf_file=kwargs.get("gguf_file"),
        )
    except Exception:
        return None  # HFLM raises its own, clearer error while loading


def check_passthrough_args(rest: dict[str, Any]) -> None:
    """Arguments that are not ours go to HFLM and on to ``from_pretrained``, which fail late and obscurely, after
    the weights load, so they are checked against HFLM's signature before anything loads:
    - a name HFLM does not take that looks like one of ours (``calib_*``, ``solver*``, or a near miss): a typo
      would be ``TypeError: ...__init__() got an unexpected keyword argument``;
    - a value of HFLM's bool, int or Literal arguments: HFLM takes any string as true (``parallelize=maybe`` shards
      the model), and compares ``max_length=abc`` only when it evaluates."""
    import difflib
    import inspect

    params = inspect.signature(HFLM.__init__).parameters
    ours = (*SPEC_KEYS, *_OWN_ARGS)
    for key, value in rest.items():
        if key not in params:
            # case and swapped letters too: Rank=4 and rnak=4 reached from_pretrained ("unexpected keyword argument")
            close = [k for k in ours if k.lower() == key.lower() or sorted(k) == sorted(key.lower())]
            close = close or difflib.get_close_matches(key.lower(), ours, n=1, cutoff=0.8)
            # a shortened name (warmup for warmup_calls) is too far for difflib
            close = close or [k for k in ours if len(key) >= 4 and k.startswith(key.lower())][:1]
            if close or key.lower().startswith(("calib", "solver", "energy", "measure", "warmup")):
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise SpecError(f"{key}={value!r} is not an argument of hf-tucker: {hint}its arguments are {', '.join(ours)}")
            continue
        annotation = params[key].annotation
        if not isinstance(annotation, str) or value is None:
            continue  # an annotation that is not a string comes from another lm-eval: left to HFLM
        kinds = {part.strip() for part in annotation.split("|")} - {"None"}
        if kinds == {"bool"}:  # 1/0 as hf takes them (lm-eval's parser reads '1' as an int), passed on as a bool
            rest[key] = _as_bool(key, value)
        if kinds == {"int"} and (isinstance(value, bool) or not isinstance(value, int)):
            raise SpecError(f"{key}={value!r} is invalid: expected an int")
        literal = re.fullmatch(r"Literal\[(.*)\]", annotation)
        if literal:
            choices = [c.strip().strip("'\"") for c in literal.group(1).split(",")]
            if value not in choices:
                raise SpecError(f"{key}={value!r} is invalid: valid {', '.join(choices)}")


def _tokenizer_before_load(pretrained: Any, rest: dict[str, Any]) -> Any:
    """The tokenizer HFLM will load, read before the weights for checks that need it alone; None if it cannot be
    read here (HFLM then reports why, as it loads)."""
    name = rest.get("tokenizer") or pretrained
    if not isinstance(name, str):
        return name  # a tokenizer object
    kw: dict[str, Any] = {"revision": rest.get("revision") or "main", "trust_remote_code": bool(rest.get("trust_remote_code", False))}
    if not rest.get("tokenizer"):  # the model's own files
        kw.update({k: rest[k] for k in ("subfolder", "gguf_file") if rest.get(k)})
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(name, **kw)
    except Exception:
        return None


# hf-tucker's own arguments besides the decomposition's (SPEC_KEYS).
_OWN_ARGS = ("measure_energy", "energy_idle_seconds", "warmup_calls")

# HFLM arguments that change how a dense model is read from the Hub; a compressed checkpoint is a local folder
# of factors, so they cannot apply to it.
_DENSE_ONLY_ARGS = ("revision", "subfolder", "gguf_file", "peft", "delta", "autogptq", "gptqmodel", "tp_plan", "quantization_config")


def _check_checkpoint_args(rest: dict[str, Any], where: str) -> None:
    given = [k for k in _DENSE_ONLY_ARGS if rest.get(k) not in (None, False, "")]
    if given:
        raise SpecError(f"{given[0]}={rest[given[0]]!r} cannot apply to pretrained={where!r}, a compressed checkpoint; leave it out")


def _choose_device(rest: dict[str, Any]) -> None:
    """The device as ``hf`` would take it, with its one failure caught before the weights load.

    HFLM's Python default is device="cuda" (``simple_evaluate`` drops a None device): with no device given, take
    CUDA when there is one, else the CPU. lm_eval's command line passes device="cuda:0" when ``--device`` is left
    out, and HFLM runs an indexed CUDA device that is not there on the CPU, so this does too, saying so: refusing
    it would fail the plain command on a CPU-only machine where ``hf`` runs. A bare "cuda" without CUDA, which HFLM
    would take and fail on deep inside ``from_pretrained``, is refused."""
    device = rest.get("device")
    if device is None:
        rest["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    elif str(device).startswith("cuda") and not torch.cuda.is_available() and not rest.get("parallelize"):
        if str(device) == "cuda":
            raise SpecError(f"device={device!r} is invalid: this torch ({torch.__version__}) has no usable CUDA; use device=cpu")
        print(f"hf-tucker: device={device!r} but this torch ({torch.__version__}) has no usable CUDA; running on the CPU, as hf does", file=sys.stderr)
        rest["device"] = "cpu"


def _user_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [SpecError]
    checkpoint = sys.modules.get(f"{__package__}.checkpoint")  # loaded if one of its errors can be in flight
    if checkpoint is not None:
        types.append(checkpoint.CheckpointError)
    return tuple(types)


def _running_the_lm_eval_command() -> bool:
    """``lm_eval`` / ``lm-eval`` or ``python -m lm_eval`` (also as accelerate launches it), not a user's script."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name.split(".")[0] == "lm_eval":
        return True
    return os.path.basename(sys.argv[0]) in ("lm_eval", "lm-eval") if sys.argv else False


def _print_user_errors_in_one_line() -> None:
    """Make an uncaught argument error (bad model_args, a broken checkpoint) end the ``lm_eval`` command with its
    one-line message, as ``lm-eval-lowrank`` does, instead of lm-eval's traceback through the harness. Any other
    exception, a Python caller's own script, or LM_EVAL_LOWRANK_TRACEBACK=1 keep the usual traceback."""
    previous = sys.excepthook
    if getattr(previous, "lm_eval_lowrank", False) or not _running_the_lm_eval_command():
        return

    def hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        if issubclass(exc_type, _user_error_types()) and os.environ.get("LM_EVAL_LOWRANK_TRACEBACK", "") in ("", "0"):
            print(f"Error: {exc}", file=sys.stderr)
        else:
            previous(exc_type, exc, tb)

    hook.lm_eval_lowrank = True  # type: ignore[attr-defined]
    sys.excepthook = hook


# What lm_eval's command passes for these options when they are left out (lm-eval 0.4.13's EvaluatorConfig).
_COMMAND_DEFAULTS = {"device": "cuda:0", "batch_size": 1}


def _close_meters(meters: list[Meter]) -> None:
    """Stop the energy samplers of ``meters`` (a thread each, which would otherwise poll for the process's life)."""
    for meter in meters:
        if meter.energy is not None:
            meter.energy.close()
    meters.clear()


@register_model("hf-tucker")
class HFTuckerLM(HFLM):
    """HFLM whose chosen linears are decomposed to low rank as the model loads."""

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict[str, Any] | None = None) -> HFTuckerLM:
        from lm_eval.utils import simple_parse_args_string

        _print_user_errors_in_one_line()
        keys = [item.split("=")[0].strip() for item in (arg_string or "").split(",") if item.strip()]
        if repeated := sorted({k for k in keys if keys.count(k) > 1}):  # lm-eval's parser keeps the last, silently
            raise SpecError(f"model_args: {repeated[0]} is given twice; give it once")
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None) -> HFTuckerLM:
        """As lm-eval's, but an argument given both in model_args and as the command's option (``device``,
        ``batch_size``) is one when the values agree, and a one-line error when they differ. lm-eval calls the
        constructor with both, a ``TypeError: got multiple values``, and its command always passes both options:
        ``device=cpu`` in model_args failed even with no ``--device``."""
        _print_user_errors_in_one_line()
        merged = dict(arg_dict)
        for key, value in (additional_config or {}).items():
            if value is None:
                continue
            if key in merged and str(merged[key]) != str(value):
                default = _COMMAND_DEFAULTS.get(key)
                hint = f" (lm_eval passes {default!r} when --{key} is left out)" if str(default) == str(value) else ""
                raise SpecError(f"{key} is given twice, {merged[key]!r} in model_args and {value!r} as --{key}{hint}: give it once, as --{key} {merged[key]}")
            merged[key] = value
        return cls(**merged)

    def __init__(
        self, pretrained: Any = None, measure_energy: bool = True, energy_idle_seconds: float = 1.0, warmup_calls: int | str = "auto", **kwargs: Any
    ) -> None:
        _print_user_errors_in_one_line()
        # lm-eval passes model_args as strings: "no" and "abc" would be a true flag and a TypeError after the load.
        measure_energy = _as_bool("measure_energy", measure_energy)
        energy_idle_seconds = _as_float_in("energy_idle_seconds", energy_idle_seconds, lambda x: 0 <= x < math.inf, "expected seconds >= 0 (0: no idle baseline)")
        warmup = None if str(warmup_calls).strip().lower() == "auto" else _as_int("warmup_calls", warmup_calls, "expected auto or an int >= 0")
        if warmup is not None and warmup < 0:
            raise SpecError(f"warmup_calls={warmup!r} is invalid: expected auto or an int >= 0")
        # rank collides with HFLM.rank (the data-parallel index): ours come out first.
        ours, rest = split_model_args(kwargs)
        check_passthrough_args(rest)
        if rest.get("batch_size") is not None:
            check_batch_size(rest["batch_size"])
        check_dtype_args(rest)
        check_local_paths({**rest, "pretrained": pretrained})
        spec = DecompositionSpec.from_args(ours)  # syntax errors before anything loads
        if rest.get("tp_plan") and not spec.is_noop:
            raise SpecError(
                f"tp_plan={rest['tp_plan']!r} shards every weight over the processes, and decomposition needs whole "
                "weights: use parallelize=True (layers over GPUs) or accelerate launch (data parallel)"
            )
        if pretrained is None:
            raise SpecError("pretrained is required, e.g. --model_args 'pretrained=PATH_OR_ID,rank=1,layers=3|18|32'")
        checkpoint = None
        if isinstance(pretrained, str):
            try:
                from .checkpoint import CompressedCheckpoint

                checkpoint = CompressedCheckpoint.detect(pretrained)
            except ImportError:
                checkpoint = None
        leak_check = None
        if checkpoint is not None:
            if not spec.is_noop:
                raise SpecError(f"pretrained={pretrained!r} is a compressed checkpoint; give no rank/layers/budget for it")
            from .calibration import check_checkpoint_no_leak, evaluated_tasks_from_env

            # Before the weights load: the data its calibration and healing read vs the tasks evaluated now.
            leak_check = check_checkpoint_no_leak(checkpoint.manifest, evaluated_tasks_from_env(), where=str(pretrained))
            _check_checkpoint_args(rest, str(pretrained))
        else:
            check_model_folder(pretrained, rest)
            config = _load_config(pretrained, rest)
            if config is not None:
                validate_against_config(spec, config)  # range errors before the weights load
            if not spec.is_noop:
                from .calibration import check_calibration_args, check_calibration_windows

                check_calibration_args(spec, config)  # calib names, data files, the no-leak rule, calib_len
                if spec.reads_calibration:  # calib_n x calib_len against the sources: needs the tokenizer only
                    check_calibration_windows(spec, _tokenizer_before_load(pretrained, rest))
        _choose_device(rest)
        self.decomposition_spec = spec
        self._lowrank_report: dict[str, Any] | None = None
        self._measurements: dict[str, Any] | None = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            # the load peak below is this load's, not an earlier model's evaluation in this process
            for i in range(torch.cuda.device_count()):
                torch.cuda.reset_peak_memory_stats(i)
        load_start = time.perf_counter()
        self._checkpoint = checkpoint
        if checkpoint is not None:
            # As a path, so HFLM sets up `accelerate launch` data parallelism and parallelize=True as for any model;
            # _create_model builds it from the checkpoint.
            super().__init__(pretrained=str(checkpoint.path), **rest)
            self._lowrank_report = checkpoint.report()
            self._lowrank_report["leak_check"] = leak_check
        else:
            super().__init__(pretrained=pretrained, **rest)
        self._enable_cpu_data_parallel(bool(rest.get("parallelize", False)))
        load_seconds = time.perf_counter() - load_start
        if not spec.is_noop:
            model_id = pretrained if isinstance(pretrained, str) else None
            if model_id is not None and rest.get("subfolder"):  # the weights and config read are the subfolder's
                model_id = f"{model_id.rstrip('/')}/{str(rest['subfolder']).strip('/')}"
            # Data-parallel processes hold the same model: they split the solves and exchange the factors.
            shard = ProcessShard.create() if self.world_size > 1 else None
            report = compress_model(self._model, spec, tokenizer=self.tokenizer, model_id=model_id, progress=self.rank == 0, shard=shard)
            self._lowrank_report = report.to_dict()
        elif self._lowrank_report is None:
            from .decompose import count_parameters

            n = count_parameters(self._model)
            self._lowrank_report = {"method": None, "modules": [], "params_before": n, "params_after": n, "params_removed": 0, "param_reduction": 0.0, "decomposition_seconds": 0.0}
        self._lowrank_report["load_seconds"] = load_seconds
        self._lowrank_report["factors_sha256"] = factors_digest(self._model)
        model_devices = {p.device for p in self._model.parameters() if not p.is_meta} | hook_execution_devices(self._model)
        if self.device.type == "cuda" and torch.cuda.is_available():
            # Load + decomposition peak over the GPUs the model occupies (summed, as the meter's peak of a sharded
            # model); the meter then measures the evaluation's own peak.
            gpus = sorted({d.index or 0 for d in model_devices if d.type == "cuda"}) or [self.device.index or 0]
            self._lowrank_report["load_peak_memory_bytes"] = int(sum(torch.cuda.max_memory_allocated(i) for i in gpus))
        if (path := experts_forward_path(self._model)) is not None:  # checks the grouped forward before any is timed
            self._lowrank_report["experts_forward"] = path
        self._lowrank_report["model_devices"] = sorted(str(d) for d in model_devices)
        if warmup is None:  # CUDA's first call also loads kernels and sets up cuBLAS; a CPU's costs little extra
            warmup = 1 if self.device.type == "cuda" else 0
        self._meter_args = {"measure_energy": measure_energy, "idle_seconds": energy_idle_seconds, "model_devices": model_devices, "warmup_calls": warmup}
        self._evaluation = 0  # the evaluation the meter measures; one more after each report (get_model_info)
        self._reported = False
        self._meters: list[Meter] = []  # the live meter, for the finalizer to stop its energy sampler
        weakref.finalize(self, _close_meters, self._meters)
        self._start_meter()

    def _start_meter(self) -> None:
        _close_meters(self._meters)
        self._meter = Meter.create(self.device, **self._meter_args)
        self._meters[:] = [self._meter]
        self._evaluation += 1
        self._reported = False
        self._measurements = None
        if self._meter.energy is not None and self._meter.energy.available:
            self._meter.energy.measure_idle()

    def _begin_requests(self) -> None:
        """A model evaluated again after its figures were reported (lm-eval's simple_evaluate called twice on one
        loaded model): the next JSON holds that evaluation's figures, not the sum since the load."""
        reported = self._reported
        if self.world_size > 1:  # only process 0 reports: every process follows it
            flag = [reported]
            torch.distributed.broadcast_object_list(flag, src=0)
            reported = bool(flag[0])
        if reported:
            self._start_meter()

    def _create_model(
        self,
        pretrained: str,
        dtype: Any = "auto",
        parallelize: bool | None = False,
        gpus: int | None = None,
        max_memory_per_gpu: int | str | None = None,
        max_cpu_memory: int | str | None = None,
        offload_folder: str | None = "./offload",
        **kwargs: Any,
    ) -> None:
        if self._checkpoint is None:
            try:
                return super()._create_model(
                    pretrained, dtype=dtype, parallelize=parallelize, gpus=gpus, max_memory_per_gpu=max_memory_per_gpu,
                    max_cpu_memory=max_cpu_memory, offload_folder=offload_folder, **kwargs,
                )  # fmt: skip
            except TypeError as exc:
                # A key nobody takes (foo=bar) reaches the model's constructor, before any weight is read: which
                # keys from_pretrained and the config consume cannot be listed beforehand, so it is caught here.
                unknown = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
                if unknown is None or unknown.group(1) not in kwargs:
                    raise
                key = unknown.group(1)
                raise SpecError(
                    f"{key}={kwargs[key]!r} is not an argument of hf-tucker, HFLM, from_pretrained or the model ({exc}); "
                    f"hf-tucker's own are {', '.join((*SPEC_KEYS, *_OWN_ARGS))}"
                ) from None
        # Where HFLM would put a from_pretrained model: one device, or a device map over the GPUs (parallelize).
        placement = self._get_accelerate_args(
            parallelize=parallelize, device_map=kwargs.get("device_map"), max_memory_per_gpu=max_memory_per_gpu,
            max_cpu_memory=max_cpu_memory, offload_folder=offload_folder, gpus=gpus,
        )  # fmt: skip
        device_map = placement.get("device_map") or {"": str(self.device)}
        self._model = self._checkpoint.load_model(
            dtype=dtype, device_map=device_map, max_memory=placement.get("max_memory"), offload_folder=placement.get("offload_folder"),
        )  # fmt: skip

    def _enable_cpu_data_parallel(self, parallelize: bool) -> None:
        # HFLM turns data parallelism on only when it counts more than one GPU, so
        # `accelerate launch` on CPUs (gloo) would have every process evaluate every document.
        acc = getattr(self, "accelerator", None)
        if acc is not None and acc.num_processes > 1 and self._world_size == 1 and not parallelize:
            self._rank, self._world_size = acc.process_index, acc.num_processes

    # -- measured calls ---------------------------------------------------------------
    def _model_call(self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        while self._meter.wants_warmup:  # the first batch, untimed, so its timing is not CUDA's start-up
            with self._meter.warmup():
                super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        with self._meter.measure("model_call", tokens=int(inps.numel()), input_tokens=int(inps.numel())):
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)

    def _model_generate(self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs: Any) -> torch.Tensor:
        while self._meter.wants_warmup:  # two new tokens: the prompts' forward and one decoding step, untimed
            with self._meter.warmup():
                warm_length = context.shape[1] + 2 if self.backend == "causal" else 2  # seq2seq counts the decoder's
                super()._model_generate(context, warm_length, stop, **dict(generation_kwargs))
        with self._meter.measure("generate", tokens=0, input_tokens=int(context.numel())) as rec:
            out = super()._model_generate(context, max_length, stop, **generation_kwargs)
            rec.tokens = int((out.shape[1] - context.shape[1]) * out.shape[0])  # new tokens only
        return out

    def _detect_batch_size(self, requests: Any = None, pos: int = 0) -> int:
        with self._meter.excluded():  # probing forwards are not part of the evaluation
            return super()._detect_batch_size(requests, pos)

    # -- sync points: every process reaches these together ---------------------------
    def loglikelihood(self, requests: Any, disable_tqdm: bool = False) -> Any:
        self._begin_requests()
        out = super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        self._sync_measurements()
        return out

    def loglikelihood_rolling(self, requests: Any, disable_tqdm: bool = False) -> Any:
        self._begin_requests()
        out = super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)
        self._sync_measurements()
        return out

    def generate_until(self, requests: Any, disable_tqdm: bool = False) -> Any:
        self._begin_requests()
        out = super().generate_until(requests, disable_tqdm=disable_tqdm)
        self._sync_measurements()
        return out

    def _sync_measurements(self) -> None:
        summary = self._meter.summary()
        if self.world_size > 1:
            gathered = [None] * self.world_size
            torch.distributed.all_gather_object(gathered, summary)
            self._measurements = aggregate(gathered)
            reports = [None] * self.world_size
            mine = (self._lowrank_report.get("modules"), self._lowrank_report.get("factors_sha256"))
            torch.distributed.all_gather_object(reports, mine)
            self._lowrank_report["identical_across_processes"] = all(r == reports[0] for r in reports)
        else:
            self._measurements = aggregate([summary])

    # -- results JSON ------------------------------------------------------------------
    def lowrank_info(self) -> dict[str, Any]:
        measurements = self._measurements or aggregate([self._meter.summary()])
        if (path := experts_forward_path(self._model)) is not None:  # now what the evaluation's forwards ran
            self._lowrank_report["experts_forward"] = path
        return {
            "schema_version": SCHEMA_VERSION,
            "decomposition": self._lowrank_report,
            "evaluation": self._evaluation,  # 1 for the first evaluation since the load; its own figures each
            **measurements,
            "versions": versions(),
        }

    def get_model_info(self) -> dict[str, Any]:
        info = super().get_model_info()
        info[RESULTS_KEY] = self.lowrank_info()
        self._reported = True
        return info
