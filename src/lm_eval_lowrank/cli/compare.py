"""``lm-eval-lowrank compare``: a side-by-side table of hf-tucker runs."""

from __future__ import annotations

import click

from .errors import InputError, OneLineBadParameter


@click.command("compare")
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--tasks", default=None, help="Comma-separated tasks to show (default: all of the first run's).")
@click.option(
    "--confidence",
    type=float,
    default=0.95,
    show_default=True,
    metavar="LEVEL",
    help="Two-sided level of each drop's interval against the first run (paired over documents when both runs used --log_samples, else from lm-eval's standard errors), and of each latency ratio's (paired over batches when both runs timed the same ones).",
)
def compare(runs: tuple[str, ...], tasks: str | None, confidence: float) -> None:
    """Compare lm-eval results (files or output folders); the first run is the reference."""
    from ..compare import UnknownTaskError, comparison_rows, format_table
    from ..gate import GateError

    if not 0 < confidence < 1:
        raise OneLineBadParameter(f"{confidence!r} is not a level in (0, 1), e.g. 0.95", param_hint="'--confidence'")
    names = [t.strip() for t in tasks.split(",") if t.strip()] if tasks is not None else None
    if tasks is not None and not names:  # --tasks '' showed every task, as if it were not given
        raise OneLineBadParameter(f"{tasks!r} names no task; give names separated by ',' (or leave --tasks out for all)", param_hint="'--tasks'")
    notes: list[str] = []
    try:
        header, rows = comparison_rows(runs, names or None, confidence, notes)
    except UnknownTaskError as exc:
        raise OneLineBadParameter(str(exc), param_hint="'--tasks'") from None
    except GateError as exc:  # a malformed or foreign file: an input error, as gate says
        raise InputError(str(exc)) from None
    click.echo(format_table(header, rows))
    for note in notes:  # why a drop is not paired; on stderr, so stdout stays one Markdown table
        click.echo(f"note: {note}", err=True)
