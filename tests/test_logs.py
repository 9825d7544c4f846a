"""Logs for machines: one JSON object a line (ts, level, logger, msg, node_id / event), a
traceback in one record, secrets masked in both formats; real coordinator and agent processes
started with --log-format json / NODEWATCH_LOG_FORMAT."""

from __future__ import annotations

import io
import json
import logging
import re
import time
from pathlib import Path

import pytest

from nodewatch.cli.processes import LocalCluster, http_json
from nodewatch.config import ConfigError, load_config
from nodewatch.logs import JsonFormatter, Masker, TextFormatter, configure_logging, resolve_format
from tests.helpers import free_port, wait_until

SECRET = "s3cr3t-agent-token-value"
ADMIN = "adm1n-token-value"
RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_format_comes_from_flag_then_environment_then_config_then_text() -> None:
    env = {"NODEWATCH_LOG_FORMAT": "json"}
    assert resolve_format("text", "json", env) == "text"
    assert resolve_format(None, "text", env) == "json"
    assert resolve_format(None, "json", {}) == "json"
    assert resolve_format(None, "text", {}) == "text"
    assert resolve_format(None, "", {}) == "text"


def test_auto_is_text_on_a_terminal_and_json_elsewhere() -> None:
    assert resolve_format("auto", "text", {}, stream=_Tty()) == "text"
    assert resolve_format("auto", "text", {}, stream=io.StringIO()) == "json"


def test_a_bad_format_names_where_it_came_from() -> None:
    with pytest.raises(ConfigError, match="NODEWATCH_LOG_FORMAT: expected one of text, json"):
        resolve_format(None, "text", {"NODEWATCH_LOG_FORMAT": "xml"})


def test_config_keys_are_validated_with_their_names(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[coordinator]\nlog_format = "xml"\n')
    with pytest.raises(ConfigError, match=r"coordinator.log_format.*text, json, auto"):
        load_config(path)
    path.write_text('[agent]\nlog_format = 1\n')
    with pytest.raises(ConfigError, match=r"agent.log_format"):
        load_config(path)
    path.write_text('[agent]\nlog_format = "json"\n[coordinator]\nlog_format = "auto"\n')
    cfg = load_config(path)
    assert (cfg.agent.log_format, cfg.coordinator.log_format) == ("json", "auto")


def _record(msg: str, *args: object, exc: bool = False, **extra: object) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError(f"bad {SECRET}")
        except ValueError:
            import sys

            exc_info = sys.exc_info()
    record = logging.LogRecord("nodewatch.coordinator", logging.WARNING, __file__, 1, msg, args,
                               exc_info)
    record.__dict__.update(extra)
    return record


def test_json_record_has_the_fields_and_the_traceback_in_one_line() -> None:
    fmt = JsonFormatter(Masker([SECRET]))
    line = fmt.format(_record("event %s %s", "web-1", "unhealthy", exc=True,
                              node_id="web-1", event="unhealthy"))
    assert "\n" not in line
    doc = json.loads(line)
    assert RFC3339.match(doc["ts"])
    assert doc["level"] == "warning" and doc["logger"] == "nodewatch.coordinator"
    assert doc["msg"] == "event web-1 unhealthy"
    assert doc["node_id"] == "web-1" and doc["event"] == "unhealthy"
    assert doc["exc"].startswith("Traceback") and "ValueError: bad ***" in doc["exc"]
    assert SECRET not in line


def test_records_without_a_node_have_no_node_fields() -> None:
    doc = json.loads(JsonFormatter(Masker()).format(_record("coordinator listening")))
    assert set(doc) == {"ts", "level", "logger", "msg"}


@pytest.mark.parametrize("text", [
    f"token {SECRET} refused", f"Authorization: Bearer {ADMIN}",
    f"store redis://user:{ADMIN}@10.0.0.1:6379/0 down",
])
def test_secrets_are_masked_in_both_formats(text: str) -> None:
    masker = Masker([SECRET])
    for fmt in (JsonFormatter(masker), TextFormatter(masker)):
        out = fmt.format(_record("%s", text))
        assert SECRET not in out and ADMIN not in out and "***" in out


def test_configure_logging_replaces_its_handler_and_stamps_the_agent_node_id() -> None:
    root = logging.getLogger()
    level = root.level
    stream = io.StringIO()
    try:
        first = configure_logging("info", "text", stream=io.StringIO())
        second = configure_logging("info", "json", secrets=[SECRET], node_id="web-9",
                                   stream=stream)
        assert first not in root.handlers and second in root.handlers
        logging.getLogger("nodewatch.agent").info("token %s", SECRET)
        doc = json.loads(stream.getvalue().splitlines()[-1])
        assert doc["node_id"] == "web-9" and doc["msg"] == "token ***"
    finally:
        root.removeHandler(second)
        root.setLevel(level)
        import sys
        import threading

        sys.excepthook = sys.__excepthook__
        threading.excepthook = threading.__excepthook__
        logging.captureWarnings(False)


# ---------------------------------------------------------------------- real processes

FAST = f"""
[coordinator]
agent_token = "{SECRET}"
admin_token = "{ADMIN}"
log_format = "json"

[detection]
healthy_interval = "500ms"
unhealthy_interval = "200ms"
timeout = "300ms"
connect_timeout = "200ms"
startup_grace = "0"

[agent]
sample_interval = "1s"
agent_token = "{SECRET}"
"""


def _json_lines(text: str) -> list[dict[str, object]]:
    docs = []
    for line in text.splitlines():
        doc = json.loads(line)  # every line is one object: nothing else on stderr
        assert isinstance(doc, dict) and {"ts", "level", "logger", "msg"} <= set(doc), line
        docs.append(doc)
    return docs


def test_real_coordinator_and_agent_log_json_lines_without_secrets(tmp_path: Path) -> None:
    with LocalCluster(workdir=tmp_path, coordinator_listen=f"127.0.0.1:{free_port()}",
                      config_text=FAST, env={"NODEWATCH_LOG_FORMAT": ""}) as cluster:
        cluster.start_coordinator()  # log_format = "json" from [coordinator]
        host = "127.0.8.1"
        cluster.env["NODEWATCH_LOG_FORMAT"] = "json"  # the agent from the environment
        cluster.start_agent("web-1", f"{host}:{free_port(host)}")
        wait_until(lambda: [n for n in cluster.nodes() if n["health"] == "healthy"],
                   timeout=20, message="web-1 healthy")
        status, _ = http_json(f"{cluster.url}/v1/nodes/web-1/drain", "POST", {"reason": "x"},
                              token=ADMIN)
        assert status == 200
        # A request with a wrong token logs nothing of it either.
        http_json(f"{cluster.url}/v1/nodes/web-1/undrain", "POST", token="wrong-" + ADMIN)
        time.sleep(0.2)
        cluster.stop()
        coordinator = cluster.coordinator
        agent = cluster.agents["web-1"]
        assert coordinator is not None
        c_log, a_log = coordinator.log(), agent.log()
    for text in (c_log, a_log):
        assert SECRET not in text and ADMIN not in text
    c_docs, a_docs = _json_lines(c_log), _json_lines(a_log)
    drained = [d for d in c_docs if d.get("event") == "drained"]
    assert drained and drained[0]["node_id"] == "web-1", c_docs[-5:]
    assert any(str(d["msg"]).startswith("coordinator listening") for d in c_docs)
    assert a_docs and all(d["node_id"] == "web-1" for d in a_docs)
    assert any("registered with" in str(d["msg"]) for d in a_docs)


def test_plain_text_stays_the_default(tmp_path: Path) -> None:
    with LocalCluster(workdir=tmp_path, coordinator_listen=f"127.0.0.1:{free_port()}",
                      config_text="", env={"NODEWATCH_LOG_FORMAT": ""}) as cluster:
        cluster.start_coordinator()
        cluster.stop()
        assert cluster.coordinator is not None
        text = cluster.coordinator.log()
    assert re.search(r"^\S+ \S+ INFO nodewatch.coordinator: coordinator listening", text, re.M)
    assert not text.lstrip().startswith("{")
