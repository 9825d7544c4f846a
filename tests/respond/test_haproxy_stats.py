"""HAProxy as an observer: ``show stat`` CSV read by field name, per-interval deltas (counter
resets, unknown servers, missing fields) on given times, the poll loop's failure handling on a
scripted socket, and the counts of a real haproxy in front of real backends."""

from __future__ import annotations

import asyncio
import logging
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import pytest

from nodewatch.config import load_config
from nodewatch.model import CallerObservation
from nodewatch.respond.actions import ActionError, haproxy_server, node_for_haproxy_server
from nodewatch.respond.haproxy_stats import (
    HaproxyObserver,
    ServerStats,
    StatDeltas,
    StatFormatError,
    build_observers,
    parse_show_stat,
    show_stat_command,
)
from tests.respond.servers import Haproxy, NamedBackend, running

HEADER = ("# pxname,svname,stot,econ,eresp,status,check_status,hrsp_1xx,hrsp_2xx,hrsp_3xx,"
          "hrsp_4xx,hrsp_5xx,hrsp_other,req_tot,rtime,ttime,zzz_future_field")


def row(server: str, *, stot: int = 0, econ: int = 0, eresp: int = 0, h2: int = 0,
        h5: int = 0, rtime: str = "3", backend: str = "be") -> str:
    req_tot = h2 + h5
    return (f"{backend},{server},{stot},{econ},{eresp},UP,L7OK,0,{h2},0,0,{h5},0,{req_tot},"
            f"{rtime},5,x")


def csv_text(*rows: str, header: str = HEADER) -> str:
    return "\n".join([header, *rows]) + "\n\n"


def stats(server: str, **counts: int) -> dict[str, ServerStats]:
    return parse_show_stat(csv_text(row(server, **counts)), "be")


# ---------------------------------------------------------------------- parsing


def test_fields_are_read_by_header_name_and_only_the_backends_servers() -> None:
    # Columns in another order than HAProxy's and one it may add later: names decide.
    text = csv_text(
        "be,FRONTEND,9,,,OPEN,,0,9,0,0,0,0,9,,,x",
        row("web-1", stot=12, econ=1, eresp=2, h2=7, h5=3, rtime="17"),
        row("web-1", stot=99, h2=99, backend="other"),
        "be,BACKEND,12,1,2,UP,,0,7,0,0,3,0,10,9,9,x",
    )
    assert parse_show_stat(text, "be") == {"web-1": ServerStats(
        server="web-1", responses=10, sessions=12, http_5xx=3, connect_errors=1,
        response_errors=2, rtime_ms=17.0, status="UP", check_status="L7OK")}
    web1 = parse_show_stat(text, "be")["web-1"]
    # Refused and broken requests never reach req_tot: they count as requests and as errors.
    assert (web1.requests, web1.errors) == (13, 6)


def test_missing_fields_fall_back_or_leave_the_server_out() -> None:
    without_req_tot = ("# pxname,svname,stot,hrsp_2xx,hrsp_5xx,econ\n"
                       "be,web-1,30,8,2,1\n")
    [web1] = parse_show_stat(without_req_tot, "be").values()
    assert (web1.responses, web1.requests, web1.errors, web1.rtime_ms) == (10, 11, 3, None)
    tcp_mode = "# pxname,svname,stot,hrsp_2xx,req_tot,econ,eresp\nbe,db-1,40,,,2,\n"
    [db1] = parse_show_stat(tcp_mode, "be").values()
    assert (db1.responses, db1.requests, db1.errors) == (None, 40, 2)
    uncountable = "# pxname,svname,status\nbe,web-1,UP\n"
    assert parse_show_stat(uncountable, "be") == {}


@pytest.mark.parametrize("answer", ["No such proxy.\n\n", "", "Unknown command.\n"])
def test_an_answer_that_is_not_show_stat_csv_is_an_error(answer: str) -> None:
    with pytest.raises(StatFormatError, match="not show stat CSV"):
        parse_show_stat(answer, "be")


def test_server_names_are_node_ids_both_ways() -> None:
    assert haproxy_server("web-1") == "web-1"
    assert node_for_haproxy_server(haproxy_server("web-1.zone_a")) == "web-1.zone_a"
    assert node_for_haproxy_server("web:1") is None
    assert show_stat_command("be") == "show stat be 4 -1"


# ---------------------------------------------------------------------- deltas


def test_the_first_snapshot_is_a_baseline_then_each_interval_is_counted() -> None:
    deltas = StatDeltas(max_span=5.0)
    assert deltas.advance(stats("web-1", h2=100, h5=5), 10.0) == []
    [obs] = deltas.advance(stats("web-1", h2=180, h5=25, econ=2, rtime="40"), 11.0)
    assert obs == CallerObservation(node_id="web-1", requests=102.0, errors=22.0,
                                    latency_p99_ms=40.0, window=1.0)


def test_a_counter_that_went_back_skips_that_interval_and_rebaselines() -> None:
    deltas = StatDeltas(max_span=5.0)
    deltas.advance(stats("web-1", h2=5000, h5=50), 10.0)
    assert deltas.advance(stats("web-1", h2=30, h5=1), 11.0) == []  # haproxy reloaded
    assert deltas.resets == 1
    [obs] = deltas.advance(stats("web-1", h2=90, h5=11), 12.0)
    assert (obs.requests, obs.errors) == (70.0, 10.0)


def test_only_an_error_counter_going_back_is_a_reset_too() -> None:
    deltas = StatDeltas(max_span=5.0)
    deltas.advance(stats("web-1", h2=100, econ=9), 10.0)
    assert deltas.advance(stats("web-1", h2=150, econ=0), 11.0) == []
    assert deltas.resets == 1


def test_unknown_servers_new_servers_and_idle_servers() -> None:
    deltas = StatDeltas(max_span=5.0)
    deltas.advance(parse_show_stat(csv_text(row("web-1", h2=10), row("web:odd", h2=10)), "be"),
                   10.0)
    later = csv_text(row("web-1", h2=10), row("web:odd", h2=50), row("web-2", h2=40))
    # web-1 answered nothing (drained): not an observation; web-2 is new: its baseline;
    # web:odd cannot be a node id: never observed, remembered for one log line.
    assert deltas.advance(parse_show_stat(later, "be"), 11.0) == []
    assert deltas.unnamed == {"web:odd"}
    [obs] = deltas.advance(parse_show_stat(csv_text(row("web-2", h2=65)), "be"), 12.0)
    assert (obs.node_id, obs.requests) == ("web-2", 25.0)


def test_latency_only_from_an_interval_with_answers_and_errors_at_most_requests() -> None:
    deltas = StatDeltas(max_span=5.0)
    deltas.advance(stats("web-1", h2=10, econ=0, eresp=0), 10.0)
    # Only refused connections: rtime is stale, so no latency; eresp counted once (<= requests).
    [obs] = deltas.advance(stats("web-1", h2=10, econ=6, eresp=3, rtime="900"), 11.0)
    assert (obs.requests, obs.errors, obs.latency_p99_ms) == (9.0, 9.0, None)


def test_an_interval_longer_than_the_outlier_window_is_skipped() -> None:
    deltas = StatDeltas(max_span=5.0)
    deltas.advance(stats("web-1", h2=10), 10.0)
    assert deltas.advance(stats("web-1", h2=500), 16.0) == []  # 6 s: older than the window
    [obs] = deltas.advance(stats("web-1", h2=520), 17.0)
    assert obs.requests == 20.0


# ---------------------------------------------------------------------- the poll loop


class Recorder:
    def __init__(self, unknown: Sequence[str] = ()) -> None:
        self.calls: list[tuple[str, list[CallerObservation]]] = []
        self.unknown = list(unknown)

    def __call__(self, source: str, observations: Sequence[CallerObservation]) -> list[str]:
        self.calls.append((source, list(observations)))
        return self.unknown


class ScriptedSocket:
    """Answers of the admin socket in order: text, an exception, or None (never answers)."""

    def __init__(self, *answers: str | Exception | None) -> None:
        self.answers = list(answers)
        self.commands: list[str] = []

    async def __call__(self, socket_path: str, command: str) -> str:
        self.commands.append(command)
        answer = self.answers.pop(0)
        if answer is None:
            await asyncio.Event().wait()
        if isinstance(answer, Exception):
            raise answer
        assert isinstance(answer, str)
        return answer


def observer(sock: ScriptedSocket, times: list[float]) -> HaproxyObserver:
    return HaproxyObserver("/run/haproxy.sock", "be", interval=1.0, timeout=0.2, max_span=5.0,
                           clock=lambda: times.pop(0), command=sock)


async def test_an_outage_is_logged_once_skipped_and_followed_by_a_fresh_baseline(
        caplog: pytest.LogCaptureFixture) -> None:
    ok = [csv_text(row("web-1", h2=n, h5=n // 10)) for n in (100, 150, 300, 360)]
    sock = ScriptedSocket(ok[0], ok[1], ActionError("haproxy socket /run/haproxy.sock: No such "
                                                    "file or directory"),
                          None, "No such proxy.\n", ok[2], ok[3])
    record = Recorder()
    obs = observer(sock, [1.0, 2.0, 6.0, 7.0])
    with caplog.at_level(logging.INFO, logger="nodewatch.respond"):
        assert [await obs.poll_once(record) for _ in range(7)] == [0, 1, 0, 0, 0, 0, 1]
    assert sock.commands == ["show stat be 4 -1"] * 7
    assert [(source, [o.requests for o in batch]) for source, batch in record.calls] == [
        ("haproxy:be", [55.0]), ("haproxy:be", [66.0])]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "No such file or directory" in warnings[0]
    assert sum("answering again" in r.getMessage() for r in caplog.records) == 1
    assert obs.outage == ""


async def test_a_socket_that_never_answers_is_given_up_within_the_timeout() -> None:
    sock = ScriptedSocket(None)
    obs = observer(sock, [])
    async with asyncio.timeout(2.0):
        assert await obs.poll_once(Recorder()) == 0
    assert "no answer within 0.2s" in obs.outage


async def test_servers_unknown_to_the_coordinator_are_logged_once(
        caplog: pytest.LogCaptureFixture) -> None:
    answers = [csv_text(row("ghost-1", h2=n)) for n in (10, 20, 30, 40)]
    obs = observer(ScriptedSocket(*answers), [1.0, 2.0, 3.0, 4.0])
    with caplog.at_level(logging.INFO, logger="nodewatch.respond"):
        for _ in answers:
            await obs.poll_once(Recorder(unknown=["ghost-1"]))
    assert sum("ghost-1" in r.getMessage() for r in caplog.records) == 1


async def test_run_polls_on_a_beat_until_cancelled_and_survives_a_failing_verb() -> None:
    answers = [csv_text(row("web-1", h2=10 * n)) for n in range(1, 50)]
    obs = HaproxyObserver("/s", "be", interval=0.05, timeout=0.2, max_span=5.0,
                          command=ScriptedSocket(*answers))
    calls: list[int] = []
    three = asyncio.Event()

    def failing(source: str, observations: Sequence[CallerObservation]) -> list[str]:
        calls.append(len(observations))
        if len(calls) >= 3:
            three.set()
        raise RuntimeError("the coordinator is busy")

    task = asyncio.create_task(obs.run(failing))
    async with asyncio.timeout(5.0):
        await three.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert calls[:3] == [1, 1, 1]


def test_one_observer_per_observing_haproxy_action_none_with_outliers_off() -> None:
    actions = {"actions": [
        {"type": "haproxy", "socket": "/a.sock", "backend": "web", "observe_interval": "500ms"},
        {"type": "haproxy", "socket": "/b.sock", "backend": "api", "observe": False},
        {"type": "webhook", "url": "http://127.0.0.1:1/hook"},
    ]}
    cfg = load_config(None, actions)
    [only] = build_observers(cfg)
    assert (only.source, only.socket_path, only.interval, only.timeout, only.max_span) == (
        "haproxy:web", "/a.sock", 0.5, 5.0, 5.0)
    assert build_observers(load_config(None, {**actions, "outliers": {"enabled": False}})) == []


# ---------------------------------------------------------------------- a real haproxy


class FailingBackend(NamedBackend):
    """Answers 503 to every request (the stdlib server's error path)."""

    def __init__(self, name: str, host: str) -> None:
        super().__init__(name, host)
        self.server.RequestHandlerClass.do_GET = (  # type: ignore[attr-defined]
            lambda handler: handler.send_error(503))


def send(url: str, count: int) -> None:
    for _ in range(count):
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                resp.read()
        except urllib.error.HTTPError:
            pass


async def test_the_counts_of_a_real_haproxy_in_front_of_real_backends(tmp_path: Path) -> None:
    good, bad = NamedBackend("web-1", "127.0.0.1"), FailingBackend("web-2", "127.0.0.1")
    lb = Haproxy(tmp_path / "haproxy", {"web-1": good.address, "web-2": bad.address})
    with running(good, bad, lb.start()):
        obs = HaproxyObserver(str(lb.socket), "be", interval=1.0, timeout=2.0, max_span=60.0)
        record = Recorder()
        assert await obs.poll_once(record) == 0  # the baseline
        await asyncio.to_thread(send, lb.url, 30)  # round robin: 15 each
        assert await obs.poll_once(record) == 2
        [(source, batch)] = record.calls
        assert source == "haproxy:be"
        assert {o.node_id: (o.requests, o.errors) for o in batch} == {
            "web-1": (15.0, 0.0), "web-2": (15.0, 15.0)}
        assert all(o.latency_p99_ms is not None and o.latency_p99_ms >= 0 for o in batch)
