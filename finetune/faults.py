"""Fault injection for the crash-safety tests: `FINETUNE_CRASH_AT=<point>[:<n>]` makes the
process SIGKILL itself the n-th time (default 1st) it reaches that point. Unset (always, in
normal use) this is a dictionary lookup.

Points: step (after an optimizer step), checkpoint-write (state written, directory not yet
renamed), between-phases (a phase finished, the next not started), adapter-save (adapter
file written to its temporary name, not yet renamed).
"""
from __future__ import annotations

import os
import signal

_seen: dict[str, int] = {}


def crash_point(name: str) -> None:
    wanted = os.environ.get("FINETUNE_CRASH_AT")
    if not wanted:
        return
    point, _, count = wanted.partition(":")
    if point != name:
        return
    _seen[name] = _seen.get(name, 0) + 1
    if _seen[name] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
