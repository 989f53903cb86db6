"""``lm-eval-lowrank compare``: a side-by-side table of hf-tucker runs."""

from __future__ import annotations

import click


@click.command("compare")
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--tasks", default=None, help="Comma-separated tasks to show (default: all of the first run's).")
def compare(runs: tuple[str, ...], tasks: str | None) -> None:
    """Compare lm-eval results (files or output folders); the first run is the reference."""
    from ..compare import comparison_rows, format_table
    from ..gate import GateError

    try:
        header, rows = comparison_rows(runs, tasks.split(",") if tasks else None)
    except GateError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(format_table(header, rows))
