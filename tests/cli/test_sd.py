"""``nodewatch sd``: the file is replaced atomically and only when it changes, a failed fetch
keeps the last good file, and the command writes what ``GET /v1/sd/prometheus`` answers."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from nodewatch.cli.client import ClientError, TargetGroup
from nodewatch.cli.commands import main
from nodewatch.cli.processes import LocalCluster, http_json
from nodewatch.cli.sd import keep_written, render_targets, write_targets
from tests.helpers import free_port

GROUP = TargetGroup(targets=["127.0.0.1:7301"], labels={"node_id": "web-1", "health": "ok"})


def test_written_once_then_left_alone_while_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "targets.json"
    assert write_targets(path, [GROUP]) is True
    assert json.loads(path.read_text()) == [{"targets": ["127.0.0.1:7301"],
                                             "labels": {"health": "ok", "node_id": "web-1"}}]
    inode = path.stat().st_ino
    assert write_targets(path, [GROUP]) is False
    assert path.stat().st_ino == inode
    assert write_targets(path, []) is True
    assert path.stat().st_ino != inode, "replaced by a rename, not rewritten in place"
    assert path.read_text() == "[]\n" and os.listdir(tmp_path) == ["targets.json"]
    assert path.stat().st_mode & 0o777 == 0o644 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_failed_write_leaves_the_old_file_and_no_temporary(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = tmp_path / "targets.json"
    write_targets(path, [GROUP])

    def full_disk(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError):
        write_targets(path, [])
    assert path.read_bytes() == render_targets([GROUP]) and os.listdir(tmp_path) == [path.name]


def test_watch_keeps_the_last_good_file_through_failed_fetches(tmp_path: Path) -> None:
    path = tmp_path / "targets.json"
    answers: list[list[TargetGroup] | ClientError] = [
        [GROUP], ClientError("cannot reach the coordinator"), ClientError("still not"), []]
    said: list[str] = []
    seen: list[bytes] = []

    def fetch() -> list[TargetGroup]:
        if path.exists():
            seen.append(path.read_bytes())
        answer = answers.pop(0)
        if isinstance(answer, ClientError):
            raise answer
        return answer

    assert keep_written(path, fetch, 0.01, said.append, rounds=4) == 0
    assert seen == [render_targets([GROUP])] * 3
    assert path.read_text() == "[]\n"
    assert said == [f"{path}: 1 targets",
                    f"nodewatch: cannot reach the coordinator; keeping {path} as it is",
                    f"{path}: 0 targets", f"{path}: fetching again"]


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with LocalCluster(workdir=tmp_path_factory.mktemp("sd"),
                      coordinator_listen=f"127.0.0.1:{free_port()}", config_text="") as cluster:
        cluster.start_coordinator()
        for i in (1, 2):
            status, _ = http_json(f"{cluster.url}/v1/register", "POST", {
                "node_id": f"web-{i}", "address": f"127.0.6.{i}:7301", "incarnation": 1,
                "labels": {"zone": "a" if i == 1 else "b"}})
            assert status == 200
        yield cluster.url


def test_sd_command_writes_what_the_api_answers(coordinator: str, tmp_path: Path) -> None:
    path = tmp_path / "sd" / "targets.json"
    path.parent.mkdir()
    # The nodes' addresses answer nobody, so their health moves (unknown, then suspect) while
    # the command runs: the file holds the answer of one moment between these two reads.
    _, before = http_json(f"{coordinator}/v1/sd/prometheus")
    result = CliRunner().invoke(main, ["sd", "--file", str(path), "--coordinator", coordinator])
    _, after = http_json(f"{coordinator}/v1/sd/prometheus")
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"{path}: 2 targets"
    assert json.loads(path.read_text()) in (before, after)
    result = CliRunner().invoke(main, ["sd", "--file", str(path), "--label", "zone=b",
                                       "--coordinator", coordinator])
    assert [g["labels"]["node_id"] for g in json.loads(path.read_text())] == ["web-2"]


def test_sd_command_failures_are_one_line(tmp_path: Path) -> None:
    path = tmp_path / "targets.json"
    dead = f"http://127.0.0.1:{free_port()}"
    result = CliRunner().invoke(main, ["sd", "--file", str(path), "--coordinator", dead])
    assert result.exit_code == 1 and "cannot reach the coordinator" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not path.exists()
    result = CliRunner().invoke(main, ["sd", "--file", str(path), "--watch", "100ms",
                                       "--coordinator", dead])
    assert result.exit_code == 2 and "between 1s and 1h" in result.output
