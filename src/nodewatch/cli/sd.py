"""``nodewatch sd``: Prometheus ``file_sd`` files, written atomically and kept fresh.

Prometheus re-reads a file_sd file when it changes; a reader must never see half a file, so
each version is written to a temporary file beside it, flushed to disk and renamed over it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

import msgspec

from nodewatch.cli.client import ClientError, TargetGroup

__all__ = ["keep_written", "render_targets", "write_targets"]


def render_targets(groups: Sequence[TargetGroup]) -> bytes:
    """The file's bytes: the http_sd JSON list, stable across runs (sorted keys)."""
    return (json.dumps(msgspec.to_builtins(list(groups)), indent=2, sort_keys=True)
            + "\n").encode()


def write_targets(path: Path, groups: Sequence[TargetGroup]) -> bool:
    """Replace ``path`` with ``groups`` unless it holds them already; True if it was written."""
    data = render_targets(groups)
    with contextlib.suppress(OSError):
        if path.read_bytes() == data:
            return False
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return True


class _Stop(Exception):
    """SIGTERM, turned into an orderly end of the watch loop."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Stop


def keep_written(path: Path, fetch: Callable[[], Sequence[TargetGroup]], interval: float,
                 say: Callable[[str], None], rounds: int | None = None) -> int:
    """Fetch and write every ``interval`` seconds until Ctrl-C or SIGTERM (or ``rounds``);
    a failed fetch or write is one line and keeps the last good file. Returns 0."""
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    failing = False
    done = 0
    try:
        while rounds is None or done < rounds:
            started = time.monotonic()
            try:
                groups = fetch()
                if write_targets(path, groups):
                    say(f"{path}: {len(groups)} targets")
                if failing:
                    say(f"{path}: fetching again")
                failing = False
            except ClientError as exc:
                if not failing:
                    say(f"nodewatch: {exc}; keeping {path} as it is")
                failing = True
            except OSError as exc:
                say(f"nodewatch: cannot write {path}: {exc.strerror or exc}")
            done += 1
            if rounds is None or done < rounds:
                time.sleep(max(0.0, interval - (time.monotonic() - started)))
    except (KeyboardInterrupt, _Stop):
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0
