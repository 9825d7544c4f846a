"""Issue 13 (b) and (c): the store fails under the coordinator.

(b) SQLite on a small tmpfs that fills up; (c) etcd and Redis hung (SIGSTOP) and killed
(SIGKILL) while commands are being written. Each answer to a command must be a 2xx (then it
is stored) or a 503 that names the store, within a bound; never a 500, never a hang; what was
acknowledged must still be there after the store returns and the coordinator restarts, and
detection must go on meanwhile.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

import nodewatch.config
from tests.faults.cluster import FaultCluster, config, start_etcd, start_redis
from tests.faults.netns import Network, TmpfsDisk
from tests.faults.results import Figures, Recorder, repeats
from tests.helpers import wait_until

pytestmark = pytest.mark.faults

NODES = 3
#: A command must be answered within this (the coordinator's store_timeout plus slack).
ANSWER_BOUND = 10.0
# The key comes with the store-failure work (another branch); until it is merged the
# coordinator would refuse it as unknown, so it is set only where config.py knows it.
STORE_TIMEOUT = ('store_timeout = "2s"'
                 if "store_timeout" in Path(nodewatch.config.__file__).read_text() else "")


class Ledger:
    """Drain/undrain commands on one node; remembers what was acknowledged."""

    def __init__(self, c: FaultCluster, fig: Figures, store_word: str) -> None:
        self.c = c
        self.fig = fig
        self.store_word = store_word
        self.acked: dict[str, str] = {}  # node -> admin state last acknowledged
        self.answers: list[tuple[int, float, str]] = []
        self.uncertain: set[str] = set()  # last answer: "may have been applied"

    def toggle(self, node_id: str) -> int:
        want = "active" if self.acked.get(node_id) == "drained" else "drained"
        verb = "undrain" if want == "active" else "drain"
        started = time.monotonic()
        status, body = self.c.command(f"/v1/nodes/{node_id}/{verb}", {"reason": "fault suite"},
                                      timeout=ANSWER_BOUND + 5)
        took = time.monotonic() - started
        text = str(body.get("error", "")) if isinstance(body, dict) else str(body)
        self.answers.append((status, took, text))
        if 200 <= status < 300:
            self.acked[node_id] = want
            self.uncertain.discard(node_id)
        elif status == 503 and "may have been applied" in text:
            # The store cannot tell whether the write landed (a timeout after sending): either
            # state is then right, and the coordinator adopts what the store holds.
            self.uncertain.add(node_id)
        if 200 <= status < 300:
            pass
        elif not (status == 503 and self.store_word in text.lower() and took <= ANSWER_BOUND):
            self.fig.wrong_answers += 1
        return status

    def refused(self) -> list[tuple[int, float, str]]:
        return [a for a in self.answers if a[0] == 503]

    def summary(self) -> str:
        """Answers by status (0: none within the bound) and the slowest, for the table."""
        counts = Counter(a[0] for a in self.answers)
        slowest = max((a[1] for a in self.answers), default=0.0)
        return (", ".join(f"{k or 'none'}: {v}" for k, v in sorted(counts.items()))
                + f"; slowest {slowest:.1f} s")

    def lost(self) -> int:
        return sum(1 for node_id, admin in self.acked.items()
                   if node_id not in self.uncertain
                   and self.c.node(node_id).get("admin") != admin)


def stored_events_lost(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> int:
    ids = {e["id"] for e in after}
    return sum(1 for e in before if e["id"] not in ids)


@pytest.mark.parametrize("run", repeats())
def test_full_disk_answers_503_naming_the_store_and_loses_nothing(
    net: Network, tmp_path: Path, recorder: Recorder, run: int
) -> None:
    fig = recorder.new("b SQLite store on a full disk", run)
    disk = TmpfsDisk(tmp_path, size_kib=4096)
    try:
        c = FaultCluster(net, tmp_path, config(tmp_path / "actions.log", coordinator=(
            f'store = "sqlite:///{disk.path}/state.db"\n{STORE_TIMEOUT}')))
        coord = net.add_host("coord")
        c.start_coordinator(coord)
        for i in range(1, NODES + 1):
            c.start_agent(f"n{i}", net.add_host(f"n{i}"))
        wait_until(lambda: c.all_healthy(NODES), timeout=30, message="healthy nodes")
        ledger = Ledger(c, fig, "store")
        for _ in range(3):
            assert 200 <= ledger.toggle("n1") < 300
        before = c.events()
        disk.fill()
        deadline = time.monotonic() + 30
        for _ in range(20):  # bounded: 20 commands, 30 s
            if time.monotonic() > deadline:
                break
            ledger.toggle("n2")
            time.sleep(0.2)
        refused = ledger.refused()
        disk.free()
        # Detection went on meanwhile: a killed agent is still confirmed.
        killed = time.time()
        c.agent("n3").signal(signal.SIGKILL)
        try:
            wait_until(lambda: c.health("n3") == "unhealthy", timeout=15,
                       interval=0.05, message="n3 confirmed after the disk filled")
            confirmed = [e for e in c.events() if e["kind"] == "unhealthy"
                         and e["node_id"] == "n3"]
            # The event's own time if the events can be read, else when the harness saw it.
            seen = confirmed[0]["ts"] if confirmed else time.time()
            fig.detections = [round(seen - killed, 3)]
        except AssertionError:
            fig.missed = 1
        for _ in range(2):
            ledger.toggle("n1")
        c.coordinator().stop()
        c.start_coordinator(coord)
        fig.commands_lost = ledger.lost()
        fig.events_lost = stored_events_lost(before, c.events())
        fig.false_confirmations = len([e for e in c.events() if e["kind"] == "unhealthy"
                                       and e["node_id"] != "n3"])
        fig.notes = f"answers {ledger.summary()}"
        assert refused, f"no command was refused on a full disk: {ledger.answers}"
        assert fig.wrong_answers == 0, ledger.answers
        assert fig.commands_lost == 0 and fig.events_lost == 0, (
            ledger.answers, ledger.acked, {n: c.node(n).get("admin") for n in ledger.acked})
        assert fig.missed == 0 and fig.false_confirmations == 0
        fig.passed = True
    finally:
        recorder.write(fig)
        net.close()  # the processes let go of the mount before it goes
        disk.close()


@pytest.mark.parametrize("fault", ["hang", "kill"])
@pytest.mark.parametrize("store", ["etcd", "redis"])
def test_store_hung_or_killed_mid_write(
    net: Network, tmp_path: Path, recorder: Recorder, store: str, fault: str
) -> None:
    fig = recorder.new(f"c {store} store {'hung (SIGSTOP)' if fault == 'hang' else 'killed'}")
    try:
        store_host = net.add_host("store")
        if store == "redis":
            server, url = start_redis(store_host, tmp_path / "redis")
            servers = {"redis": server}

            def restart() -> None:
                servers["redis"] = start_redis(store_host, tmp_path / "redis")[0]
        else:
            servers, url = start_etcd([store_host], tmp_path / "etcd")

            def restart() -> None:
                servers.update(start_etcd([store_host], tmp_path / "etcd", existing=True)[0])
        c = FaultCluster(net, tmp_path, config(tmp_path / "actions.log",
                                               coordinator=STORE_TIMEOUT))
        coord = net.add_host("coord")
        c.start_coordinator(coord, "--store", url)
        for i in range(1, NODES + 1):
            c.start_agent(f"n{i}", net.add_host(f"n{i}"))
        wait_until(lambda: c.all_healthy(NODES), timeout=30, message="healthy nodes")
        ledger = Ledger(c, fig, store)
        for _ in range(4):
            assert 200 <= ledger.toggle("n1") < 300, ledger.answers
        before = c.events()
        proc = next(iter(servers.values()))
        # Mid-write: the fault lands while a command is being written.
        writer = threading.Thread(target=lambda: [ledger.toggle("n2") for _ in range(3)])
        writer.start()
        time.sleep(0.05)
        proc.signal(signal.SIGSTOP if fault == "hang" else signal.SIGKILL)
        writer.join(3 * (ANSWER_BOUND + 6))
        killed = time.time()
        c.agent("n3").signal(signal.SIGKILL)
        deadline = time.monotonic() + 20
        for _ in range(6):  # bounded: 6 commands, 20 s
            if time.monotonic() > deadline:
                break
            ledger.toggle("n1")
        try:
            wait_until(lambda: c.health("n3") == "unhealthy", timeout=15,
                       interval=0.05, message=f"n3 confirmed with {store} down")
            confirmed = [e for e in c.events() if e["kind"] == "unhealthy"
                         and e["node_id"] == "n3"]
            # The event's own time if the events can be read, else when the harness saw it.
            seen = confirmed[0]["ts"] if confirmed else time.time()
            fig.detections = [round(seen - killed, 3)]
        except AssertionError:
            fig.missed = 1
        if fault == "hang":
            proc.signal(signal.SIGCONT)
        else:
            restart()
        for _ in range(2):
            ledger.toggle("n1")
        c.coordinator().stop()
        c.start_coordinator(coord, "--store", url)
        fig.commands_lost = ledger.lost()
        fig.events_lost = stored_events_lost(before, c.events())
        fig.false_confirmations = len([e for e in c.events() if e["kind"] == "unhealthy"
                                       and e["node_id"] != "n3"])
        fig.notes = f"answers {ledger.summary()}"
        assert ledger.refused(), f"no command was refused with {store} down: {ledger.answers}"
        assert fig.wrong_answers == 0, ledger.answers
        assert fig.commands_lost == 0 and fig.events_lost == 0, (
            ledger.answers, ledger.acked, {n: c.node(n).get("admin") for n in ledger.acked})
        assert fig.missed == 0 and fig.false_confirmations == 0
        fig.passed = True
    finally:
        recorder.write(fig)
