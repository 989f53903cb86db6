"""``lm-eval-lowrank space``: design-space size and the parameter/FLOP cost of one configuration.

Config only: no weights, no torch. Values use the same syntax as ``model_args``
(``--rank 8|q:4``, ``--layers 3-30:3``, ``--tensors q|k|v``).
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import click

from ..spec import SpecError
from .errors import InputError, OneLineBadParameter


class SpaceError(InputError):
    """A bad value: printed as one ``Error: ...`` line, exit code 2 (like SpecError in cli.main)."""

    exit_code = 2


def _seq_len(value: str) -> int:
    try:
        n = int(str(value).strip())
    except ValueError:
        n = -1
    if n < 0:
        raise OneLineBadParameter(f"{value!r} is not an int >= 0", param_hint="'--seq-len'")
    return n


def _rank_choices(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        n = int(str(value).strip())
    except ValueError:
        n = 0
    if n < 1:
        raise OneLineBadParameter(f"{value!r} is not an int >= 1", param_hint="'--rank-choices'")
    return n


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def _fmt_flops(n: int) -> str:
    for unit, scale in (("T", 10**12), ("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if abs(n) >= scale:
            return f"{n / scale:.3f} {unit}FLOP ({n:,})"
    return f"{n} FLOP"


def _sci(n: int) -> str:
    """``n`` in scientific notation; Decimal, because |S| can be past a float's range (--rank-choices 10**310)."""
    return format(Decimal(n), ".3e")


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _human(r: dict[str, Any], nt: int) -> str:
    spec = r["spec"]
    rows = [
        ("model", f"{r['model']} ({r['adapter']}, {r['num_layers']} layers, hidden {r['hidden_size']})"),
        ("tensors/layer", "|".join(r["tensors"])),
        ("decomposition", f"rank={spec['rank'] or '-'} layers={spec['layers']} tensors={spec['tensors']}"),
        ("layout", f"{r['layout']} ({'r(m+n)+r²' if r['layout'] == 'tucker' else 'r(m+n)'} params per module)"),
        ("modules", f"{r['decomposed_modules']} decomposed, {r['kept_dense']} kept dense (rank saves nothing)"),
        ("params total", _fmt_int(r["params_total"])),
        ("params after", _fmt_int(r["params_after"])),
        ("param reduction", f"{100 * r['param_reduction']:.2f}%"),
        ("FLOPs/token before", _fmt_flops(r["flops_before"])),
        ("FLOPs/token after", _fmt_flops(r["flops_after"])),
        ("FLOP reduction", f"{100 * r['flop_reduction']:.2f}%  (seq_len {r['seq_len']})"),
        (
            "design space |S|",
            f"(2^{nt}-1)(2^{r['num_layers']}-1)*{r['rank_choices']}+1 = {_sci(r['design_space_size'])} "
            f"= 2^{r['log2_design_space_size']:.2f}",
        ),
    ]
    out = _table(rows)
    if r.get("modules"):
        mods = [(m["path"], f"{m['shape'][0]}x{m['shape'][1]} r={m['rank']}  {m['params_before']:,} -> {m['params_after']:,}") for m in r["modules"]]
        out += "\n\n" + _table(mods)
    return out


@click.command("space")
@click.option("--model", "model", default="smollm2-135m", show_default=True, help="Built-in name, a config.json, a folder holding one, or a Hub id (only its config.json is fetched).")
@click.option("--rank", default=None, help="Rank, e.g. 1 or 8|q:4|gate:32 (model_args syntax). Omit for the dense model.")
@click.option("--layers", default=None, help="1-based layers: 3|18|32, 3-30:3 or all.")
@click.option("--tensors", default=None, help="Short names joined by '|' (q|k|v|o|gate|up|down) or all.")
@click.option("--layout", default="auto", show_default=True, help="folded: r(m+n) params; tucker: r(m+n)+r² (the paper's count); auto = folded, as hf-tucker loads.")
@click.option("--seq-len", "seq_len", default="1024", show_default=True, help="Attended positions for the attention FLOPs.")
@click.option("--rank-choices", "rank_choices", default=None, help="Size of the rank axis of |S| (default: the hidden size).")
@click.option("--per-module", "per_module", is_flag=True, help="List every decomposed module.")
@click.option("--table4", is_flag=True, help="One row per Table-4 layer set (scaled to this depth) at --rank (default 1).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def space(
    model: str,
    rank: str | None,
    layers: str | None,
    tensors: str | None,
    layout: str,
    seq_len: str,
    rank_choices: str | None,
    per_module: bool,
    table4: bool,
    as_json: bool,
) -> None:
    """Design-space size and the parameter/FLOP cost of one configuration (no weights)."""
    from .. import design_space as ds

    n_seq = _seq_len(seq_len)
    n_rank_choices = _rank_choices(rank_choices)
    if table4:  # its rows show neither modules nor |S|: these options would be ignored
        for given, option in ((per_module, "--per-module"), (rank_choices is not None, "--rank-choices")):
            if given:
                raise SpaceError(f"--table4 shows one row per layer set, without modules or |S|; drop {option}")
    elif rank is None and (layers is not None or tensors is not None):
        # the spec's own message offers budget=F, which space does not take
        raise SpaceError("--tensors/--layers need --rank (e.g. --rank 8, or --rank 8|q:4 per tensor)")
    try:
        config = ds.load_config(model)
        args: dict[str, Any] = {"layout": layout}
        for key, value in (("rank", rank), ("layers", layers), ("tensors", tensors)):
            if value is not None:
                args[key] = value
        if table4:
            _print_table4(ds, config, args, n_seq, n_rank_choices, as_json)
            return
        report = ds.calculate(config, args, seq_len=n_seq, rank_choices=n_rank_choices, per_module=per_module)
    except SpecError as exc:
        raise SpaceError(str(exc)) from None
    d = report.to_dict()
    if as_json:
        click.echo(json.dumps(d, indent=2))
    else:
        click.echo(_human(d, len(report.tensors)))


def _print_table4(ds: Any, config: dict[str, Any], args: dict[str, Any], seq_len: int, rank_choices: int | None, as_json: bool) -> None:
    if "layers" in args:
        raise SpaceError("--table4 chooses the layers itself; drop --layers")
    args = {"rank": 1, "tensors": "all", **args}
    adapter = ds.config_adapter(config)
    rows = []
    for name, layer_set in ds.table4_layer_sets(adapter.num_layers(config)).items():
        r = ds.calculate(config, {**args, "layers": "|".join(map(str, layer_set))}, seq_len=seq_len, rank_choices=rank_choices)
        rows.append(
            {
                "set": name,
                "layers": "|".join(map(str, layer_set)),
                "params_after": r.params_after,
                "param_reduction": r.param_reduction,
                "flop_reduction": r.flop_reduction,
                "layout": r.layout,
            }
        )
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    head = ("set", "layers", "params after", "param cut", "FLOP cut")
    body = [(x["set"], x["layers"], f"{x['params_after']:,}", f"{100 * x['param_reduction']:.2f}%", f"{100 * x['flop_reduction']:.2f}%") for x in rows]
    widths = [max(len(str(row[i])) for row in [head, *body]) for i in range(len(head))]
    click.echo(f"layout {rows[0]['layout'] if rows else '-'}, rank {args['rank']}, tensors {args['tensors']}")
    for row in [head, *body]:
        click.echo("  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
