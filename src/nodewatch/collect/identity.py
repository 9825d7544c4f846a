"""The agent's identity across restarts: incarnation, the seq ceiling, last_ts and the node
credential, kept in the state directory (mode 0600) with atomic writes (temp file, fsync,
rename, fsync of the directory).

Seqs are reserved in blocks (hi/lo): the file always holds a ``reserved`` value that no exposed
seq exceeds, so after a crash the agent can report a ``last_seq`` that is never behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

import msgspec

__all__ = ["PersistedState", "StateFile"]

log = logging.getLogger("nodewatch.agent")


class PersistedState(msgspec.Struct, kw_only=True):
    node_id: str
    incarnation: int
    seq: int  # the last seq exposed as of this write (exact after a clean stop)
    reserved: int  # no seq above this one was ever exposed
    last_ts: float  # the ts of the last report exposed (the node's own clock)
    clean: bool = False  # True only when written by a clean stop
    # The node credential the coordinator issued (a secret: the file is mode 0600, and it is
    # never logged); empty before enrolment.
    credential: str = ""


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(PersistedState)


class StateFile:
    """One node's state file in the state directory (several agents may share a directory)."""

    def __init__(self, state_dir: str | Path, node_id: str) -> None:
        self.dir = Path(state_dir)
        self.path = self.dir / f"{node_id}.state.json"
        self._lock = asyncio.Lock()

    def load(self) -> PersistedState | None:
        """The last written state, or None when there is none (or it cannot be trusted)."""
        try:
            return _decoder.decode(self.path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, msgspec.DecodeError) as exc:
            log.warning("state file %s is unreadable (%s); starting as a new node", self.path, exc)
            return None

    def save(self, state: PersistedState) -> None:
        """Write atomically: a reader (or a restart after a crash) sees the old or the new."""
        self.dir.mkdir(parents=True, exist_ok=True)
        temp = self.path.with_name(self.path.name + ".tmp")
        data = _encoder.encode(state)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # a leftover temp file keeps its mode otherwise
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, self.path)
        with contextlib.suppress(OSError):
            dir_fd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    async def save_async(self, state: PersistedState) -> None:
        """``save`` off the event loop; writes are serialised so the newest always wins."""
        async with self._lock:
            await asyncio.to_thread(self.save, state)
