"""Optional dependencies: a missing one is a one-line error naming the extra that brings it."""

from __future__ import annotations

import importlib.util

from .spec import SpecError


class MissingDependencyError(SpecError):
    """An optional package a command needs is not installed (a SpecError, so the CLIs print it in one line)."""


def require_module(module: str, extra: str, needed_for: str) -> None:
    """Raise before any work starts when ``module`` cannot be imported."""
    if importlib.util.find_spec(module) is None:
        raise MissingDependencyError(f"{needed_for} needs the {module} package: pip install 'lm-eval-lowrank[{extra}]'")
