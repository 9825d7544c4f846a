"""Rendezvous shares: the same table everywhere, an even spread, and minimal moves."""

from __future__ import annotations

import pytest

from nodewatch.detect.shares import SHARES, Assignment, moved, share_of

MEMBERS = [f"127.0.0.1:{7300 + i}" for i in range(5)]


def test_a_nodes_share_is_stable_and_in_range() -> None:
    ids = [f"node-{i:05d}" for i in range(2000)]
    first = [share_of(i) for i in ids]
    share_of.cache_clear()
    assert [share_of(i) for i in ids] == first
    assert all(0 <= k < SHARES for k in first)
    # Sequential ids still spread over (nearly) every share.
    assert len(set(first)) > SHARES * 0.95


def test_every_coordinator_computes_the_same_table_whatever_the_order() -> None:
    assert Assignment.of(MEMBERS) == Assignment.of(reversed(MEMBERS))
    assert Assignment.of(set(MEMBERS)).owners == Assignment.of(sorted(MEMBERS)).owners


def test_shares_spread_evenly() -> None:
    counts = Assignment.of(MEMBERS).counts()
    assert sum(counts.values()) == SHARES
    assert min(counts.values()) >= SHARES / len(MEMBERS) * 0.6
    assert max(counts.values()) <= SHARES / len(MEMBERS) * 1.4


def test_a_lost_member_moves_only_its_own_shares() -> None:
    before = Assignment.of(MEMBERS)
    after = Assignment.of(MEMBERS[:-1])
    assert moved(before, after) == before.held_by(MEMBERS[-1])
    assert not after.held_by(MEMBERS[-1])


def test_an_added_member_takes_only_what_it_wins() -> None:
    before = Assignment.of(MEMBERS)
    joined = "127.0.0.1:7399"
    after = Assignment.of([*MEMBERS, joined])
    assert moved(before, after) == after.held_by(joined)
    assert 0 < len(after.held_by(joined)) < SHARES / 3


def test_no_members_own_nothing_and_one_member_owns_everything() -> None:
    assert set(Assignment.of([]).owners) == {""}
    only = Assignment.of(["a"])
    assert only.held_by("a") == frozenset(range(SHARES))
    assert only.owner("node-1") == "a"


def test_assignments_of_different_sizes_do_not_compare() -> None:
    with pytest.raises(ValueError, match="16 and 256"):
        moved(Assignment.of(MEMBERS, shares=16), Assignment.of(MEMBERS))
