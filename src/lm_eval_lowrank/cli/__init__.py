"""The ``lm-eval-lowrank`` command: thin click commands over the library.

Each subcommand lives in its own module and is imported only when it runs, so
``lm-eval-lowrank --help`` and light commands (``space``, ``gate``) never import torch.
"""

from __future__ import annotations

import importlib
import sys

import click

# name -> (module, attribute, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "space": ("lm_eval_lowrank.cli.space", "space", "Design-space size and parameter/FLOP calculator (no weights)."),
    "gate": ("lm_eval_lowrank.cli.gate", "gate", "Fail when a compressed result drops more than a tolerance."),
    "sweep": ("lm_eval_lowrank.cli.sweep", "sweep", "Run a characterisation grid through hf-tucker into a store."),
    "report": ("lm_eval_lowrank.cli.sweep", "report", "Markdown table and plots from a sweep store."),
    "search": ("lm_eval_lowrank.cli.sweep", "search", "Cheapest configuration within an accuracy-drop tolerance."),
    "decompose": ("lm_eval_lowrank.cli.checkpoint", "decompose", "Decompose a model and save a compressed checkpoint."),
    "heal": ("lm_eval_lowrank.cli.checkpoint", "heal", "Short healing fine-tune of a compressed checkpoint."),
    "analyze": ("lm_eval_lowrank.cli.analyze", "analyze", "Singular spectra, energy, effective rank, sparsity."),
    "compare": ("lm_eval_lowrank.cli.compare", "compare", "Side-by-side accuracy and efficiency of hf-tucker runs."),
    "tasks": ("lm_eval_lowrank.cli.tasks", "tasks", "Print the --include_path of the offline local tasks (--list: names, docs)."),
    "env": ("lm_eval_lowrank.cli.env", "env", "What a run here will measure: energy counters, timer, solvers, registration."),
    "fetch-model": ("lm_eval_lowrank.cli.fetch", "fetch_model", "Fetch and convert the embedded default model (SmolLM2)."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        try:
            return getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError as exc:
            if exc.name == module:  # not built yet in this version
                return None
            raise

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(n, COMMANDS[n][2]) for n in sorted(COMMANDS)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup)
@click.version_option(package_name="lm-eval-lowrank")
def cli() -> None:
    """Low-rank compression for lm-evaluation-harness: design space, gates, checkpoints."""


def main() -> None:
    from ..spec import SpecError

    try:
        cli(standalone_mode=False)
    except click.exceptions.Abort as exc:
        # Ctrl-C ended in silence with status 1; the shell's convention for SIGINT is 128 + 2
        interrupted = isinstance(exc.__cause__ or exc.__context__, KeyboardInterrupt)
        click.echo("Aborted." if interrupted else "Aborted!", err=True)
        sys.exit(130 if interrupted else 1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except SpecError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(2)
    except SystemExit:
        raise
