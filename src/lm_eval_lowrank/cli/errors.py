"""The CLI's one-line usage error, shared by the commands."""

from __future__ import annotations

from typing import Any

import click


class OneLineBadParameter(click.BadParameter):
    """A usage error naming the option, printed as one ``Error: ...`` line (no usage banner); exit code 2."""

    def show(self, file: Any = None) -> None:
        click.echo(f"Error: {self.format_message()}", err=True)


class InputError(click.ClickException):
    """A problem with an input file, folder or value found past option parsing: one ``Error: ...`` line and exit
    code 2, as a usage error (1 stays for a failed run, and for gate's verdict)."""

    exit_code = 2
