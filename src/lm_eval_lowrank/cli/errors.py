"""The CLI's one-line usage error, shared by the commands."""

from __future__ import annotations

from typing import Any

import click


class OneLineBadParameter(click.BadParameter):
    """A usage error naming the option, printed as one ``Error: ...`` line (no usage banner); exit code 2."""

    def show(self, file: Any = None) -> None:
        click.echo(f"Error: {self.format_message()}", err=True)
