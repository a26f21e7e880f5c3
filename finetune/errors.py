"""User-facing errors.

A user mistake (bad recipe, missing file, unusable data) raises `UserError`; the CLI prints
its one-line message (or lines, one per problem) and exits with code 2, with no traceback.
Anything else is a bug in the kit and keeps its traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; `lines` are printed one per line, exit code 2."""

    exit_code = 2

    def __init__(self, *lines: str):
        self.lines = [line for line in lines if line]
        super().__init__("\n".join(self.lines))


class RecipeError(UserError):
    """Every problem found in a recipe, collected in one pass (`file:line: key.path: message`)."""
