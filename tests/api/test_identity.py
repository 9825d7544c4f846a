"""Node identity (issue 14), in one process: agents against a coordinator (HTTP and UDP), an
impostor with the agent token, forged heartbeats, a wiped state directory, revoke, etcd
announcements. The same stories with separate processes on separate hosts (network
namespaces) are in ``tests/faults/test_identity.py``."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

import msgspec

from nodewatch.collect.agent import Agent
from nodewatch.collect.identity import PersistedState
from nodewatch.detect.identity import Identity
from nodewatch.model import Admin, Health
from nodewatch.protocol import (
    CREDENTIAL_HEADER,
    AgentLease,
    credential_hash,
    lease_proof,
    lease_proven,
    node_heartbeat_key,
)
from tests.api.test_app import ADMIN, AGENT, beat, reg_body
from tests.api.test_udp import KEY, TOKEN, Rig, _rig, _signed
from tests.helpers import async_wait_until, free_port


async def _agent(rig: Rig, state_dir: Path, port: int | None = None,
                 transport: str = "udp") -> Agent:
    agent = Agent(node_id="node-a", listen=f"127.0.0.1:{port or free_port()}",
                  coordinator=str(rig.client.make_url("")), state_dir=state_dir,
                  agent_token=TOKEN, heartbeat_interval=0.05, run_sampler=False,
                  heartbeat_transport=transport)
    await agent.start()
    return agent


def _stored_credential(state_dir: Path) -> str:
    path = state_dir / "node-a.state.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    return msgspec.json.decode(path.read_bytes(), type=PersistedState).credential


async def _healthy(rig: Rig) -> None:
    async def check() -> bool:
        await asyncio.sleep(0)
        node = rig.coord.cluster.nodes.get("node-a")
        return node is not None and node.schedulable
    await async_wait_until(check, within=10, message="node-a healthy and schedulable")


def _events(rig: Rig, kind: str) -> list[dict[str, object]]:
    return [e.to_json() for e in rig.coord.recent if e.kind == kind]


async def test_an_impostor_with_the_agent_token_changes_nothing(tmp_path: Path) -> None:
    async with _rig(tmp_path) as rig:
        real = await _agent(rig, tmp_path / "real")
        try:
            await _healthy(rig)
            secret = _stored_credential(tmp_path / "real")
            node = rig.coord.cluster.nodes["node-a"]
            assert node.credential_hash == credential_hash(secret) and secret not in str(
                node.to_json())
            before = (node.address, node.incarnation, node.admin)
            impostor = await _agent(rig, tmp_path / "impostor")
            try:
                await async_wait_until(lambda: asyncio.sleep(0, _events(rig, "identity_rejected")),
                                       within=5, message="identity_rejected")
                await asyncio.sleep(0.5)
                assert not impostor.registered.is_set()
                node = rig.coord.cluster.nodes["node-a"]
                assert (node.address, node.incarnation, node.admin) == before
                assert node.health is Health.HEALTHY and node.schedulable
                event = _events(rig, "identity_rejected")[0]
                evidence = event["evidence"]
                assert isinstance(evidence, dict)
                assert evidence["claimed_address"] == impostor.advertise_address
                assert evidence["stored_address"] == before[0]
                seq = node.seq
                await async_wait_until(
                    lambda: asyncio.sleep(0, rig.coord.cluster.nodes["node-a"].seq > seq + 3),
                    within=5, message="the real node still heartbeating")
            finally:
                await impostor.stop()
        finally:
            await real.stop()


async def test_forged_http_and_udp_heartbeats_are_refused(tmp_path: Path) -> None:
    async with _rig(tmp_path) as rig:
        resp = await rig.client.post("/v1/register", json=reg_body("web-1"), headers=AGENT)
        assert resp.status == 200
        rig.client.credentials.pop("web-1")  # from here on: someone with only the agent token
        def story() -> tuple[object, ...]:  # what a forged request could change (polls go on)
            n = rig.coord.cluster.nodes["web-1"]
            return n.address, n.incarnation, n.seq, n.admin, n.credential_hash, n.load

        before = story()
        for headers in (AGENT, {**AGENT, CREDENTIAL_HEADER: "guessed"}):
            resp = await rig.client.post("/v1/heartbeat", json=beat("web-1", seq=9),
                                         headers=headers)
            assert resp.status == 403
        rig.send(_signed(beat("web-1", seq=10), KEY))  # signed with the agent token's key
        await rig.wait_counted("bad_tag")
        resp = await rig.client.post("/v1/register", json=reg_body("web-1", incarnation=2),
                                     headers=AGENT)
        assert resp.status == 403
        assert story() == before
        # Rate-limited: one event for the four refusals, within the minute.
        assert len(_events(rig, "identity_rejected")) == 1
        assert rig.coord.cluster.identity.suppressed("web-1") == 3


async def test_wiped_state_is_re_enrolled_by_approve_and_the_old_credential_refused(
        tmp_path: Path) -> None:
    async with _rig(tmp_path) as rig:
        agent = await _agent(rig, tmp_path / "a")
        await _healthy(rig)
        old = _stored_credential(tmp_path / "a")
        await agent.stop()
        fresh = await _agent(rig, tmp_path / "wiped")  # lost its state directory
        try:
            await async_wait_until(lambda: asyncio.sleep(0, _events(rig, "identity_rejected")),
                                   within=5, message="the claim")
            claim = fresh.advertise_address
            node = rig.coord.cluster.nodes["node-a"]
            assert node.claim_address == claim
            stored = (node.credential_hash, node.admin, node.claim_address)
            # The operator names the claim meant: a newer one from elsewhere is not approved.
            resp = await rig.client.post("/v1/nodes/node-a/approve", headers=ADMIN,
                                         json={"address": "127.0.0.66:7301"})
            assert resp.status == 409
            assert f"pending claim is from {claim}" in (await resp.json())["error"]
            assert (node.credential_hash, node.admin, node.claim_address) == stored
            resp = await rig.client.post("/v1/nodes/node-a/approve", headers=ADMIN,
                                         json={"address": 7})
            assert resp.status == 422 and "address" in (await resp.json())["error"]
            resp = await rig.client.post("/v1/nodes/node-a/approve", headers=ADMIN,
                                         json={"address": claim})
            assert resp.status == 200
            await async_wait_until(lambda: asyncio.sleep(0, fresh.registered.is_set()),
                                   within=20, message="the re-enrolment")
            await _healthy(rig)
            new = _stored_credential(tmp_path / "wiped")
            assert new and new != old
            resp = await rig.client.post("/v1/heartbeat", json=beat("node-a", seq=10**6),
                                         headers={**AGENT, CREDENTIAL_HEADER: old})
            assert resp.status == 403
        finally:
            await fresh.stop()


async def test_revoke_forces_a_re_enrolment_into_review(tmp_path: Path) -> None:
    async with _rig(tmp_path) as rig:
        # Over HTTP: an agent pushing over UDP hears of the revocation only once its datagram
        # that asks goes unanswered (UDP_CONFIRM_INTERVAL) and its next heartbeat is HTTP.
        agent = await _agent(rig, tmp_path / "a", transport="http")
        try:
            await _healthy(rig)
            old = _stored_credential(tmp_path / "a")
            resp = await rig.client.post("/v1/nodes/node-a/revoke", headers=ADMIN)
            assert resp.status == 200
            await async_wait_until(
                lambda: asyncio.sleep(0, rig.coord.cluster.nodes["node-a"].admin
                                      is Admin.REVIEW),
                within=10, message="node-a in review")
            await async_wait_until(
                lambda: asyncio.sleep(0, _stored_credential(tmp_path / "a") != old),
                within=5, message="a new credential")
            resp = await rig.client.post("/v1/nodes/node-a/approve", headers=ADMIN)
            assert resp.status == 200
            await _healthy(rig)
        finally:
            await agent.stop()


def test_identity_rejected_events_are_rate_limited_per_node() -> None:
    limit = Identity(interval=60)
    assert limit.note_rejection("a", 0.0) == 0
    assert limit.note_rejection("a", 1.0) is None
    assert limit.note_rejection("b", 1.0) == 0
    assert limit.note_rejection("a", 59.0) is None
    assert limit.note_rejection("a", 61.0) == 2


async def test_an_etcd_announcement_for_an_enrolled_node_needs_its_proof(
        tmp_path: Path) -> None:
    async with _rig(tmp_path, **{"review.address_change": "allow"}) as rig:
        # Known only from etcd: no credential, etcd's access control is the identity.
        rig.coord.agent_published(AgentLease("lease-only", "127.0.0.1:7400", 1))
        assert rig.coord.cluster.nodes["lease-only"].address == "127.0.0.1:7400"
        resp = await rig.client.post("/v1/register", json=reg_body("web-1"), headers=AGENT)
        assert resp.status == 200
        key = node_heartbeat_key(rig.client.credentials["web-1"])
        moved = AgentLease("web-1", "127.0.0.9:7301", 2)
        rig.coord.agent_published(moved)  # anyone who may write to etcd: no proof
        forged = AgentLease("web-1", "127.0.0.9:7301", 2, proof=lease_proof(
            moved, node_heartbeat_key("guessed")))
        rig.coord.agent_published(forged)
        node = rig.coord.cluster.nodes["web-1"]
        assert (node.address, node.incarnation) == ("127.0.0.1:7301", 1)
        [event] = _events(rig, "identity_rejected")
        assert event["evidence"]["via"] == "lease"  # type: ignore[index]
        proven = AgentLease("web-1", "127.0.0.9:7301", 2, proof=lease_proof(moved, key))
        rig.coord.agent_published(proven)
        node = rig.coord.cluster.nodes["web-1"]
        assert (node.address, node.incarnation) == ("127.0.0.9:7301", 2)


async def test_an_enrolled_agent_signs_its_etcd_announcement(tmp_path: Path) -> None:
    async with _rig(tmp_path) as rig:
        agent = await _agent(rig, tmp_path / "a", transport="http")
        try:
            await _healthy(rig)
            lease = agent._lease_announcement()
            node = rig.coord.cluster.nodes["node-a"]
            assert lease_proven(lease, bytes.fromhex(node.udp_key))
            assert not lease_proven(lease, node_heartbeat_key("guessed"))
        finally:
            await agent.stop()


async def test_a_lost_register_answer_can_be_asked_for_again(tmp_path: Path) -> None:
    """The agent presents its own enrolment secret on its first registration; until it proves
    the credential it was issued, a retry with that secret gets another (a timeout on the
    first answer must not lock the node out until an operator approves it)."""
    async with _rig(tmp_path) as rig:
        mine = {**AGENT, CREDENTIAL_HEADER: "enrolment-secret-of-my-own"}
        first = await rig.client.post("/v1/register", json=reg_body("web-1"), headers=mine)
        assert first.status == 200
        lost = (await first.json())["credential"]  # never reached the agent
        again = await rig.client.post("/v1/register", json=reg_body("web-1"), headers=mine)
        assert again.status == 200
        answer = await again.json()
        issued = answer["credential"]
        assert issued and issued != lost and answer["decision"] == "rejoin"
        resp = await rig.client.post("/v1/heartbeat", json=beat("web-1", seq=1),
                                     headers={**AGENT, CREDENTIAL_HEADER: issued})
        assert resp.status == 204
        # Proven: neither the enrolment secret nor the lost credential is accepted now.
        for stale in ("enrolment-secret-of-my-own", lost):
            resp = await rig.client.post("/v1/heartbeat", json=beat("web-1", seq=2),
                                         headers={**AGENT, CREDENTIAL_HEADER: stale})
            assert resp.status == 403
            resp = await rig.client.post("/v1/register", json=reg_body("web-1"),
                                         headers={**AGENT, CREDENTIAL_HEADER: stale})
            assert resp.status == 403
        assert not rig.coord.cluster.nodes["web-1"].previous_hash


async def test_approve_takes_a_reason_for_its_event(tmp_path: Path) -> None:
    async with _rig(tmp_path) as rig:
        assert (await rig.client.post("/v1/register", json=reg_body("web-1"),
                                      headers=AGENT)).status == 200
        resp = await rig.client.post("/v1/register", json=reg_body("web-1", incarnation=2),
                                     headers={**AGENT, CREDENTIAL_HEADER: "lost"})
        assert resp.status == 403
        resp = await rig.client.post("/v1/nodes/web-1/approve", headers=ADMIN,
                                     json={"reason": "disk replaced"})
        assert resp.status == 409  # a claim is re-enrolled only when its address is named
        assert "approve --address 127.0.0.1:7301" in (await resp.json())["error"]
        resp = await rig.client.post("/v1/nodes/web-1/approve", headers=ADMIN,
                                     json={"reason": "disk replaced",
                                           "address": "127.0.0.1:7301"})
        assert resp.status == 200
        [event] = _events(rig, "approved")
        assert str(event["reason"]).endswith(": disk replaced")
        resp = await rig.client.post("/v1/nodes/web-1/approve", headers=ADMIN,
                                     json={"why": "x"})
        assert resp.status == 422 and "why" in (await resp.json())["error"]


async def test_a_plain_approve_of_a_review_leaves_a_planted_claim_alone(tmp_path: Path) -> None:
    async with _rig(tmp_path) as rig:
        assert (await rig.client.post("/v1/register", json=reg_body("web-1"),
                                      headers=AGENT)).status == 200
        # Back in review (its incarnation went back), proving its credential.
        resp = await rig.client.post("/v1/register", json=reg_body("web-1", incarnation=0),
                                     headers=AGENT)
        assert resp.status == 200 and (await resp.json())["decision"] == "review"
        # Someone with the agent token plants a claim from elsewhere.
        planted = await rig.client.post(
            "/v1/register", json=reg_body("web-1", address="127.0.0.66:7301"),
            headers={**AGENT, CREDENTIAL_HEADER: "none of its own"})
        assert planted.status == 403
        node = rig.coord.cluster.nodes["web-1"]
        stored = node.credential_hash
        resp = await rig.client.post("/v1/nodes/web-1/approve", headers=ADMIN)
        assert resp.status == 200
        assert node.admin is Admin.ACTIVE and node.credential_hash == stored
        assert node.claim_address == "127.0.0.66:7301" and not node.reenrol_address


async def test_a_re_enrolment_must_come_from_the_claims_source(tmp_path: Path) -> None:
    async with _rig(tmp_path) as rig:
        assert (await rig.client.post("/v1/register", json=reg_body("web-1"),
                                      headers=AGENT)).status == 200
        rig.coord.reject("web-1", via="register", claimant="127.0.0.5", reason="test",
                         claimed_address="127.0.0.1:7301")
        resp = await rig.client.post("/v1/nodes/web-1/approve", headers=ADMIN,
                                     json={"address": "127.0.0.1:7301"})
        assert resp.status == 200
        node = rig.coord.cluster.nodes["web-1"]
        assert node.reenrol_from == "127.0.0.5"
        # The test client connects from 127.0.0.1: the claimed address, the wrong source.
        resp = await rig.client.post("/v1/register", json=reg_body("web-1"),
                                     headers={**AGENT, CREDENTIAL_HEADER: "x"})
        assert resp.status == 403 and not node.credential_hash
