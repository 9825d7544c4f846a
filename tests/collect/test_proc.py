"""/proc readers: fixture tables for tcp and tcp6, and real sockets on loopback."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from nodewatch.collect.proc import count_established, count_state, read_load1
from nodewatch.collect.sampler import HostSampler
from tests.collect.conftest import FIXTURES

PROC = FIXTURES / "proc"


def test_fixture_tables_count_only_established_rows() -> None:
    assert count_state((PROC / "net" / "tcp").read_bytes()) == 3
    assert count_state((PROC / "net" / "tcp6").read_bytes()) == 2
    assert count_established(PROC) == 5


def test_missing_tcp6_table_counts_ipv4_only() -> None:
    assert count_established(FIXTURES / "proc_tcp4_only") == 3


def test_no_tables_at_all_raises_so_the_sampler_falls_back(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        count_established(tmp_path)


def test_header_only_and_blank_lines_count_zero() -> None:
    assert count_state(b"  sl  local_address rem_address   st\n\n") == 0


def test_load1_from_loadavg_fixture() -> None:
    assert read_load1(PROC) == 0.42


def test_opening_sockets_raises_the_real_count() -> None:
    count = 20
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(count)
        before = count_established()
        clients, servers = [], []
        try:
            for _ in range(count):
                client = socket.create_connection(listener.getsockname(), timeout=2)
                clients.append(client)
                servers.append(listener.accept()[0])
            after = count_established()
        finally:
            for sock in clients + servers:
                sock.close()
    # Both ends of each loopback connection are ESTABLISHED; other processes may close some
    # of theirs meanwhile, so ask only for the N we opened.
    assert after - before >= count


async def test_host_sampler_reads_fixture_root_off_the_loop() -> None:
    sampler = HostSampler(PROC)
    sampler.prime()
    sample = await sampler.sample()
    assert sample.connections == 5
    assert sample.load1 == 0.42
    assert 0.0 <= sample.cpu_percent <= 100.0 and 0.0 < sample.mem_percent <= 100.0


async def test_expensive_connection_counts_are_spaced_by_the_cpu_budget(tmp_path: Path) -> None:
    import shutil

    root = tmp_path / "proc"
    shutil.copytree(PROC, root)
    header_only = (PROC / "net" / "tcp").read_bytes().split(b"\n", 1)[0] + b"\n"
    thrifty = HostSampler(root, connections_budget=1e-12)  # any read "costs" too much
    eager = HostSampler(root, connections_budget=0)  # no budget: count on every sample
    assert (await thrifty.sample()).connections == 5
    assert (await eager.sample()).connections == 5
    (root / "net" / "tcp").write_bytes(header_only)
    assert (await thrifty.sample()).connections == 5  # the previous count, until due
    assert (await eager.sample()).connections == 2
