"""Guards around a run: one owner per run directory, graceful stop on SIGINT/SIGTERM, and
turning resource faults (disk full, GPU out of memory) into messages that say what to do.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError

MEMORY_ADVICE = ("lower optim.batch_size or raise optim.grad_accum (same global batch, less "
                 "memory), set train.gradient_checkpointing: true, train.mixed_precision: bf16, "
                 "or lower lora.rank")


def lock_path(run_dir: Path) -> Path:
    """Beside the run directory, so --overwrite can empty the directory while holding it."""
    run_dir = Path(run_dir).resolve()
    return run_dir.parent / f".{run_dir.name}.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def run_lock(run_dir: Path, say=print):
    """Hold `.<run>.lock` (pid, host, start time) for the whole run. A lock whose process is
    gone on this host is stale and taken over; a live one (or one from another host, which
    cannot be checked) is refused with its owner named."""
    path = lock_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                owner = {}
            if owner.get("host") == me["host"] and not _alive(int(owner.get("pid", -1))):
                say(f"{run_dir}: removing a stale lock of pid {owner.get('pid')} (no longer running)")
                path.unlink(missing_ok=True)
                continue
            raise UserError(
                f"{run_dir}: in use by pid {owner.get('pid', '?')} on {owner.get('host', '?')} since "
                f"{owner.get('started', '?')}; wait for it to finish, choose another output_dir, or"
                f" delete {path} if that run is gone")
        with os.fdopen(fd, "w") as handle:
            json.dump(me, handle)
        break
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


class StopRequest:
    """SIGINT / SIGTERM set a flag; the trainer checkpoints at the next step boundary and
    stops (schedulers such as Slurm send SIGTERM before an allocation ends). A second SIGINT
    interrupts at once, as users expect of Ctrl-C."""

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signal == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    @property
    def requested(self) -> bool:
        return self.signal is not None


class Stopped(Exception):
    """Raised after the stop checkpoint is written; the CLI exits 128 + signal number."""

    def __init__(self, signum: int, where: str):
        self.signum = signum
        super().__init__(where)


@contextmanager
def resource_errors(what: str, keeps: str = ""):
    """Disk full or out of GPU memory while `what` -> a UserError that says what happened,
    what is intact and what to change."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise UserError(f"disk full while writing {what}; {keeps or 'earlier files are intact'};"
                            " free space and run again with --resume") from None
        raise
    except RuntimeError as exc:
        if "out of memory" in str(exc).lower():
            raise UserError(f"out of memory during {what}: {MEMORY_ADVICE}") from None
        raise
