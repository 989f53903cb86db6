"""``lm-eval-lowrank tasks``: the ``--include_path`` folder of the local, offline benchmarks.

Typical use::

    lm_eval --model hf --model_args pretrained=PATH --tasks arc_easy_local \\
        --include_path "$(lm-eval-lowrank tasks)" --limit 5
"""

from __future__ import annotations

import click

from .errors import InputError, OneLineBadParameter


@click.command("tasks")
@click.option(
    "--data",
    "data",
    type=click.Path(file_okay=False),
    default=None,
    help="Benchmark data folder (default: $LM_EVAL_LOWRANK_DATA, else ../shared/data beside the checkout or cwd).",
)
@click.option("--list", "list_", is_flag=True, help="List the local tasks with their split and document count.")
def tasks(data: str | None, list_: bool) -> None:
    """Print the folder to pass as lm_eval --include_path (generated once, cached)."""
    from ..tasks import DataDirError, task_dir, task_table

    try:
        path = task_dir(data)
        if not list_:
            click.echo(str(path))
            return
        rows = task_table(data)
    except DataDirError as exc:
        # One line on stderr, nothing on stdout: "$(lm-eval-lowrank tasks)" then stays empty.
        if data is not None:  # the folder came from --data: name the option, not LM_EVAL_LOWRANK_DATA
            raise OneLineBadParameter(str(exc), param_hint="'--data'") from None
        raise InputError(str(exc)) from None
    width = max(len(r[0]) for r in rows)
    click.echo(f"{'task':<{width}}  {'split':<10}  {'docs':>6}  metrics")
    for name, split, docs, metrics in rows:
        click.echo(f"{name:<{width}}  {split:<10}  {docs:>6}  {metrics}")
    click.echo(f"include path: {path}")


if __name__ == "__main__":
    tasks()
