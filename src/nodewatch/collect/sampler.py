"""System sampling for the agent: CPU on the loop thread (psutil keeps its per-thread
baseline), everything that reads files off the loop, one call per sample interval."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import psutil

from nodewatch.collect.proc import (
    count_curr_estab_psutil,
    count_curr_estab_tables,
    read_curr_estab,
    read_load1,
)

__all__ = ["CONNECTIONS_CPU_BUDGET", "HostSampler", "Sampler", "SystemSample"]

log = logging.getLogger("nodewatch.agent")

# Without /proc/net/snmp, at most this fraction of one core goes to walking the socket tables
# (0.02 %): 1 ms of CPU per walk allows one every 5 s, 70 ms (about 35,000 sockets) one every
# 350 s. The kernel's counter costs the same at any socket count and is read every sample.
CONNECTIONS_CPU_BUDGET = 0.0002


@dataclass(frozen=True, slots=True)
class SystemSample:
    """One reading of the host: the ``system`` block of ``/health``."""

    cpu_percent: float
    mem_percent: float
    load1: float
    connections: int

    def as_dict(self) -> dict[str, float]:
        return {
            "cpu_percent": self.cpu_percent,
            "mem_percent": self.mem_percent,
            "load1": self.load1,
            "connections": self.connections,
        }


class Sampler(Protocol):
    """Where system samples come from; tests pass a scripted one."""

    def prime(self) -> None:
        """Start whatever baseline the next sample measures against (on the loop thread)."""

    async def sample(self) -> SystemSample:
        """Read the host without blocking the event loop."""
        ...


class HostSampler:
    """The real host: psutil for CPU and memory, ``/proc`` for load and connections."""

    def __init__(self, proc_root: str | Path = "/proc", *,
                 connections_budget: float = CONNECTIONS_CPU_BUDGET) -> None:
        self.proc_root = Path(proc_root)
        self._has_proc = (self.proc_root / "net" / "tcp").exists()
        self._budget = connections_budget
        self._connections = 0
        self._connections_due = 0.0
        # Decided once: the kernel's counter where it exists, else the budgeted table walk.
        has_snmp = (self.proc_root / "net" / "snmp").exists()
        self._count_connections: Callable[[], int] = (
            self._read_counter if has_snmp else self._walk_tables)
        #: Where the count comes from: ``snmp``, ``tables`` or ``psutil``.
        self.connections_source = "snmp" if has_snmp else "tables" if self._has_proc \
            else "psutil"

    def _read_counter(self) -> int:
        """``CurrEstab`` on every sample: a change shows within one sample interval."""
        try:
            return read_curr_estab(self.proc_root)
        except (OSError, ValueError) as exc:
            log.warning("cannot read %s/net/snmp (%s); counting the socket tables instead",
                        self.proc_root, exc)
            self._count_connections = self._walk_tables
            self.connections_source = "tables" if self._has_proc else "psutil"
            return self._walk_tables()

    def _walk_tables(self) -> int:
        """Walk the socket tables, but no more often than the CPU budget allows.

        The kernel renders every socket (TIME_WAIT included) as text: tens of ms of CPU on a
        host with tens of thousands of sockets. Each walk's own CPU cost decides when the next
        one is due, so a busy host keeps its idle overhead bounded with an older count, and a
        quiet host (well under a millisecond) counts on every sample.
        """
        now = time.monotonic()
        if now < self._connections_due:
            return self._connections
        started = time.thread_time()
        if self._has_proc:
            try:
                self._connections = count_curr_estab_tables(self.proc_root)
            except FileNotFoundError:
                self._connections = count_curr_estab_psutil()
        else:
            self._connections = count_curr_estab_psutil()
        cost = time.thread_time() - started
        self._connections_due = now + cost / self._budget if self._budget > 0 else now
        return self._connections

    def prime(self) -> None:
        psutil.cpu_percent(interval=None)

    def _read_files(self) -> tuple[float, float, int]:
        mem = psutil.virtual_memory().percent
        try:
            load1 = read_load1(self.proc_root) if self._has_proc else os.getloadavg()[0]
        except OSError:
            load1 = os.getloadavg()[0]
        return float(mem), float(load1), self._count_connections()

    async def sample(self) -> SystemSample:
        # Called from the one sampler task on the loop thread: psutil's CPU baseline is kept
        # per thread, so this call must never move into the thread pool.
        cpu = float(psutil.cpu_percent(interval=None))
        mem, load1, connections = await asyncio.to_thread(self._read_files)
        return SystemSample(cpu, mem, load1, connections)
