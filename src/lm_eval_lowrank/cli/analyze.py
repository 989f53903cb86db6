"""``lm-eval-lowrank analyze MODEL``: per-layer, per-tensor spectra, energy, effective rank, sparsity."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from .errors import OneLineBadParameter


def _parse_ints(ctx: click.Context, param: click.Parameter, value: str) -> tuple[int, ...]:
    try:
        out = tuple(int(x) for x in value.replace("|", ",").split(",") if x.strip())
    except ValueError:
        raise OneLineBadParameter(f"{value!r}: expected ints joined by ',' (e.g. 1,8,32,128)") from None
    if not out or any(x < 1 for x in out):
        raise OneLineBadParameter(f"{value!r}: expected ints >= 1")
    return out


def _check_out_path(value: str, option: str) -> None:
    """Refuse an output path that cannot be written before the model loads, not after the whole analysis."""
    path = Path(value)
    if path.is_dir():
        raise OneLineBadParameter(f"{value!r} is a folder: give a file path", param_hint=f"'{option}'")
    if not path.parent.is_dir():
        raise OneLineBadParameter(f"{value!r}: folder {path.parent} does not exist", param_hint=f"'{option}'")


def _refuse_unused(ctx: click.Context, options: dict[str, str], needs: str) -> None:
    """An option given on the command line that only ``needs`` uses: refused, not silently ignored."""
    from click.core import ParameterSource

    for name, flag in options.items():
        if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None):
            raise OneLineBadParameter(f"only {needs} uses it: add {needs} or drop {flag}", param_hint=f"'{flag}'")


def analyze_model(
    model: Any,
    layers: str | None = None,
    tensors: str | None = None,
    ranks: tuple[int, ...] = (1, 8, 32, 128),
    eps: float = 1e-3,
    provider: Any = None,
    spectrum: bool = True,
) -> dict[int, dict[str, dict[str, Any]]]:
    """{layer: {tensor: {"weights": summary, "activations": summary?}}} for the selected modules."""
    import torch

    from ..analysis import analyze_activation, analyze_weight
    from ..architectures import adapter_for_model
    from ..plan import Target
    from ..spec import expand_tensor_names, parse_layers, parse_tensors

    adapter = adapter_for_model(model)
    n_layers = adapter.num_layers(model.config)
    chosen_layers = parse_layers(layers) or tuple(range(1, n_layers + 1))
    bad = [x for x in chosen_layers if x > n_layers]
    if bad:
        from ..spec import SpecError

        raise SpecError(f"layers={layers!r} is invalid: layer {bad[0]} is past the end; valid 1..{n_layers}")
    offered = adapter.tensor_names()
    names = expand_tensor_names(parse_tensors(tensors) or offered, offered)
    out: dict[int, dict[str, dict[str, Any]]] = {}
    for layer in chosen_layers:
        paths = {t: adapter.module_path(layer - 1, t) for t in names if layer in adapter.layers_of(t, n_layers)}
        dense = {t: _dense_matrices(model, p, adapter.experts_of(t)) for t, p in paths.items()}  # (E, out, in) for experts
        stats = {}
        if provider is not None:
            targets = [Target(layer, t, p, *dense[t].shape[-2:], rank=1, experts=adapter.experts_of(t)) for t, p in paths.items()]
            stats = provider.layer_stats(model, layer, targets)
        out[layer] = {}
        for t, p in paths.items():
            W = dense[t]
            with torch.no_grad():
                if not adapter.experts_of(t):
                    entry = {"weights": analyze_weight(W, ranks, eps).to_dict(spectrum)}
                    if p in stats:
                        sp = getattr(provider, "sparsity", {}).get(p)
                        entry["activations"] = analyze_activation(W, stats[p].input_cov, ranks, sp).to_dict(spectrum)
                else:  # one summary per expert, and their mean in the place a linear's summary takes
                    per = [analyze_weight(W[e], ranks, eps).to_dict(spectrum) for e in range(W.shape[0])]
                    entry = {"weights": expert_mean(per), "experts": {"weights": per}}
                    if p in stats:
                        acts = [analyze_activation(W[e], s.input_cov, ranks).to_dict(spectrum) for e, s in enumerate(stats[p]) if s is not None]
                        if acts:
                            entry["activations"] = expert_mean(acts)
                            entry["experts"]["activations"] = acts
            out[layer][t] = entry
    return out


def _dense_matrices(model: Any, path: str, experts: int) -> Any:
    """A linear's weight (out x in), or a stacked expert projection's (E x out x in), dense."""
    from ..modules import dense_weight_of, expert_matrices, stacked_expert

    if not experts:
        mod = model.get_submodule(path)
        return dense_weight_of(getattr(mod, "base_layer", mod))[0]
    return expert_matrices(*stacked_expert(model, path))


def expert_mean(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """The mean of per-expert summaries, shaped like one (ranks rounded; no spectrum): what tables and heat maps
    show for a stacked expert projection. ``experts`` says how many it averages."""
    n = len(summaries)

    def mean(values: list[Any]) -> Any:
        return None if any(v is None for v in values) else sum(values) / n

    first = summaries[0]
    return {
        "shape": first["shape"],
        "energy": {k: mean([s["energy"][k] for s in summaries]) for k in first["energy"]},
        "effective_rank": mean([s["effective_rank"] for s in summaries]),
        "stable_rank": mean([s["stable_rank"] for s in summaries]),
        "rank_for": {k: round(mean([s["rank_for"][k] for s in summaries])) for k in first["rank_for"]},
        "sparsity": mean([s["sparsity"] for s in summaries]),
        "experts": n,
    }


def write_heatmap(results: dict[int, dict[str, dict[str, Any]]], path: str, metric: str, kinds: Sequence[str], title: str) -> None:
    """One panel per kind (weights, activations) side by side, on one colour scale so the panels compare."""
    from ..optional import require_module

    require_module("matplotlib", "plots", "the heatmap")
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt
    import numpy as np

    from ..analysis import heatmap_matrix

    panels = [(kind, *heatmap_matrix(results, metric, kind)) for kind in kinds]
    values = np.concatenate([np.array(grid, dtype=float).ravel() for _, _, _, grid in panels])
    finite = values[np.isfinite(values)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    n_tensors, n_layers = len(panels[0][2]), len(panels[0][1])
    fig, axes = plt.subplots(1, len(panels), figsize=(0.4 + len(panels) * (0.8 + 0.9 * n_tensors), 1.5 + 0.25 * n_layers), squeeze=False, layout="constrained")
    for ax, (kind, layers, tensors, grid) in zip(axes[0], panels):
        im = ax.imshow(np.array(grid, dtype=float), aspect="auto", cmap="viridis", interpolation="nearest", vmin=vmin, vmax=vmax)
        ax.set_xticks(range(len(tensors)), tensors)
        ax.set_yticks(range(len(layers)), [str(x) for x in layers])
        ax.set_xlabel("tensor")
        ax.set_title(kind)
    axes[0][0].set_ylabel("decoder layer (1-based)")
    fig.suptitle(title)
    fig.colorbar(im, ax=list(axes[0]), label=metric.replace("_frac", " / full rank").replace("_", " "))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _check_selection(model: str, layers: str | None, tensors: str | None, calibration: dict[str, Any] | None) -> Any:
    """--layers, --tensors and the calibration options, checked against the model's config before its weights
    load (a typo otherwise waited for a 7B load); the spec the activation pass calibrates with."""
    from transformers import AutoConfig

    from ..architectures import config_side_adapter
    from ..plan import make_plan
    from ..spec import DecompositionSpec

    spec = DecompositionSpec.from_args({"method": "rom" if calibration else "tucker", "rank": 1, "layers": layers or "all", "tensors": tensors or "all", **(calibration or {})})
    config = AutoConfig.from_pretrained(model)
    if (adapter := config_side_adapter(config)) is not None:  # None: remote code; checked as the analysis runs
        make_plan(spec, config, adapter=adapter)
    if calibration:
        from transformers import AutoTokenizer

        from ..calibration import check_calibration_args, check_calibration_windows

        check_calibration_args(spec, config)  # source names, data files, calib_len
        check_calibration_windows(spec, AutoTokenizer.from_pretrained(model))  # calib_n x calib_len against the sources
    return spec


@click.command("analyze")
@click.argument("model")
@click.option("--layers", default=None, help="1-based layers: 3|18|32, 3-10, 3-30:3 or all (default all).")
@click.option("--tensors", default=None, help="Tensor short names joined by '|' (default all).")
@click.option("--ranks", default="1,8,32,128", callback=_parse_ints, help="Ranks at which to report the energy kept.")
@click.option("--eps", default=1e-3, type=float, show_default=True, help="Sparsity: fraction of |w| < eps * max|w|.")
@click.option("--activations", is_flag=True, help="Also analyse the outputs Y = W X on calibration data (sequential pass).")
@click.option("--calib", default="wikitext_local", show_default=True, help="Calibration source(s) for --activations, joined by '+'.")
@click.option("--calib-n", default=16, type=int, show_default=True)
@click.option("--calib-len", default=128, type=int, show_default=True)
@click.option("--format", "fmt", type=click.Choice(["markdown", "text"]), default="markdown", show_default=True)
@click.option("--json", "json_path", default=None, help="Write the full results (spectra included) as JSON here; '-' for stdout.")
@click.option("--heatmap", default=None, help="Write a heat-map PNG here.")
@click.option("--metric", default="r95_frac", show_default=True, help="Heat-map value: r95_frac, r90_frac, r99_frac, effective_rank_frac, stable_rank, sparsity.")
@click.option("--dtype", default="float32", show_default=True, help="Load dtype (analysis runs in fp64 regardless).")
def analyze(model: str, layers: str | None, tensors: str | None, ranks: tuple[int, ...], eps: float, activations: bool, calib: str, calib_n: int, calib_len: int, fmt: str, json_path: str | None, heatmap: str | None, metric: str, dtype: str) -> None:
    """Singular spectra, energy at ranks, effective/stable rank, rank for 90/95/99% energy, sparsity."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..analysis import HEATMAP_METRICS, format_table, table_rows

    # Every option is checked before the model is fetched or loaded.
    if metric not in HEATMAP_METRICS:
        raise OneLineBadParameter(f"{metric!r}: valid {', '.join(HEATMAP_METRICS)}", param_hint="'--metric'")
    torch_dtype = getattr(torch, dtype, None)
    # transformers loads a model in floating dtypes only; 1-byte floats (float8_*) it cannot compute in
    if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point or torch_dtype.itemsize < 2:
        raise OneLineBadParameter(f"{dtype!r}: expected float32, bfloat16 or float16", param_hint="'--dtype'")
    if not (math.isfinite(eps) and eps >= 0):  # a negative eps would report a sparsity of 0 for any matrix
        raise OneLineBadParameter(f"{eps!r}: expected a number >= 0 (a fraction of max|w|)", param_hint="'--eps'")
    ctx = click.get_current_context()
    if not activations:
        _refuse_unused(ctx, {"calib": "--calib", "calib_n": "--calib-n", "calib_len": "--calib-len"}, "--activations")
    if not heatmap:
        _refuse_unused(ctx, {"metric": "--metric"}, "--heatmap")
    if json_path and json_path != "-":
        _check_out_path(json_path, "--json")
    if heatmap:
        _check_out_path(heatmap, "--heatmap")
        from ..optional import require_module

        require_module("matplotlib", "plots", "--heatmap")  # before the analysis, not after it
        from matplotlib.backend_bases import FigureCanvasBase

        kinds = FigureCanvasBase.get_supported_filetypes()
        if Path(heatmap).suffix.lower().lstrip(".") not in kinds:
            raise OneLineBadParameter(f"{heatmap!r}: not an image type matplotlib writes; valid .{', .'.join(sorted(kinds))}", param_hint="'--heatmap'")
    if model in ("smollm2", "default"):
        from ..assets import AssetError, smollm2_path

        try:
            model = str(smollm2_path())
        except AssetError as exc:
            raise click.ClickException(str(exc)) from None
    from ..spec import check_local_path
    from .sweep import check_model_has_weights

    check_model_has_weights(model, "MODEL")  # a built-in shape of `space` (llama-2-7b) has no weights to analyse
    check_local_path("MODEL", model)
    spec = _check_selection(model, layers, tensors, {"calib": calib, "calib_n": calib_n, "calib_len": calib_len} if activations else None)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype).eval()
    provider = None
    if activations:
        from ..calibration import build_stats_provider

        provider = build_stats_provider(spec, lm, AutoTokenizer.from_pretrained(model), model_id=model)
        provider.track_sparsity = eps
    results = analyze_model(lm, layers, tensors, ranks, eps, provider)
    to_stderr = json_path == "-"  # stdout then carries the JSON document alone
    click.echo(f"## weights of {model}", err=to_stderr)
    click.echo(format_table(table_rows(results, "weights"), markdown=fmt == "markdown"), err=to_stderr)
    if activations:
        click.echo(f"\n## activations (outputs Y = W X; sparsity of the inputs X) on {calib} {calib_n}x{calib_len}", err=to_stderr)
        click.echo(format_table(table_rows(results, "activations"), markdown=fmt == "markdown"), err=to_stderr)
    if json_path:
        doc = {"model": model, "ranks": list(ranks), "eps": eps, "layers": {str(k): v for k, v in results.items()}}
        if provider is not None:
            doc["calibration"] = provider.describe()
        text = json.dumps(doc, indent=1)
        if json_path == "-":
            sys.stdout.write(text + "\n")
        else:
            Path(json_path).write_text(text + "\n")
    if heatmap:
        kinds = ("weights", "activations") if activations else ("weights",)
        write_heatmap(results, heatmap, metric, kinds, f"{Path(model).name}: {metric}")
        click.echo(f"heat map: {heatmap}", err=True)
