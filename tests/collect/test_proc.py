"""/proc readers: the snmp counter and the tcp/tcp6 tables from fixtures, and real sockets on
loopback for both the count and its freshness."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from nodewatch.collect.proc import (
    count_curr_estab_tables,
    count_states,
    read_curr_estab,
    read_load1,
)
from nodewatch.collect.sampler import HostSampler
from tests.collect.conftest import FIXTURES
from tests.helpers import loopback_connections

PROC = FIXTURES / "proc"


def test_snmp_fixture_gives_the_tcp_curr_estab_counter() -> None:
    assert read_curr_estab(PROC) == 6


def test_snmp_without_a_tcp_counter_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "snmp").write_bytes(b"Udp: InDatagrams\nUdp: 4\n")
    with pytest.raises(ValueError):
        read_curr_estab(tmp_path)
    with pytest.raises(FileNotFoundError):
        read_curr_estab(FIXTURES / "proc_tcp4_only")


def test_fixture_tables_count_what_curr_estab_counts() -> None:
    # ESTABLISHED and CLOSE-WAIT rows; LISTEN, TIME_WAIT and the header are not counted.
    assert count_states((PROC / "net" / "tcp").read_bytes()) == 3
    assert count_states((PROC / "net" / "tcp6").read_bytes()) == 3
    assert count_curr_estab_tables(PROC) == read_curr_estab(PROC) == 6


def test_missing_tcp6_table_counts_ipv4_only() -> None:
    assert count_curr_estab_tables(FIXTURES / "proc_tcp4_only") == 3


def test_no_tables_at_all_raises_so_the_sampler_falls_back(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        count_curr_estab_tables(tmp_path)


def test_header_only_and_blank_lines_count_zero() -> None:
    assert count_states(b"  sl  local_address rem_address   st\n\n") == 0


def test_load1_from_loadavg_fixture() -> None:
    assert read_load1(PROC) == 0.42


def test_opening_real_sockets_raises_both_counts() -> None:
    count = 20
    counter_before, tables_before = read_curr_estab(), count_curr_estab_tables()
    with loopback_connections(count):
        counter_after, tables_after = read_curr_estab(), count_curr_estab_tables()
    # Both ends of each loopback connection count (2N); other processes may close some of
    # theirs meanwhile, so ask only for the N we opened.
    assert counter_after - counter_before >= count
    assert tables_after - tables_before >= count


async def test_host_sampler_reads_fixture_root_off_the_loop() -> None:
    sampler = HostSampler(PROC)
    sampler.prime()
    sample = await sampler.sample()
    assert sampler.connections_source == "snmp"
    assert sample.connections == 6
    assert sample.load1 == 0.42
    assert 0.0 <= sample.cpu_percent <= 100.0 and 0.0 < sample.mem_percent <= 100.0


async def test_kernel_counter_is_read_on_every_sample_whatever_the_budget() -> None:
    sampler = HostSampler(connections_budget=1e-12)  # a walk would never be due again
    assert sampler.connections_source == "snmp"
    before = (await sampler.sample()).connections
    with loopback_connections(20):
        during = (await sampler.sample()).connections
    assert during - before >= 20


async def test_without_snmp_table_walks_are_spaced_by_the_cpu_budget(tmp_path: Path) -> None:
    root = tmp_path / "proc"
    shutil.copytree(PROC, root)
    (root / "net" / "snmp").unlink()
    header_only = (PROC / "net" / "tcp").read_bytes().split(b"\n", 1)[0] + b"\n"
    thrifty = HostSampler(root, connections_budget=1e-12)  # any walk "costs" too much
    eager = HostSampler(root, connections_budget=0)  # no budget: walk on every sample
    assert thrifty.connections_source == eager.connections_source == "tables"
    assert (await thrifty.sample()).connections == 6
    assert (await eager.sample()).connections == 6
    (root / "net" / "tcp").write_bytes(header_only)
    assert (await thrifty.sample()).connections == 6  # the previous count, until due
    assert (await eager.sample()).connections == 3  # tcp6 alone


async def test_an_unreadable_counter_falls_back_to_the_tables(tmp_path: Path) -> None:
    root = tmp_path / "proc"
    shutil.copytree(PROC, root)
    sampler = HostSampler(root, connections_budget=0)
    (root / "net" / "snmp").write_bytes(b"Ip: Forwarding\nIp: 1\n")
    assert (await sampler.sample()).connections == 6
    assert sampler.connections_source == "tables"
