"""Throwaway etcd (one member or a cluster) and redis-server processes on loopback, for the
contract tests, the HA tests and the store benchmark. Data lives in a given directory; every
process is stopped (SIGTERM, then SIGKILL) by ``stop()`` or the context manager."""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["EtcdCluster", "RedisServer", "find_binary", "free_port"]

_SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")


def find_binary(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(Path(d) / name) for d in _SBIN if (Path(d) / name).exists()), None)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


def _stop(popen: subprocess.Popen[bytes] | None, timeout: float = 5.0) -> None:
    if popen is None or popen.poll() is not None:
        return
    popen.send_signal(signal.SIGTERM)
    try:
        popen.wait(timeout)
    except subprocess.TimeoutExpired:
        popen.kill()
        popen.wait(timeout)


@dataclass
class EtcdMember:
    name: str
    host: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.host}:{self.peer_port}"

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def kill(self) -> None:
        """kill -9: the member is lost, as a crashed machine would be."""
        if self.alive():
            assert self.popen is not None
            self.popen.kill()
            self.popen.wait(5)


@dataclass
class EtcdCluster:
    """``size`` etcd members on loopback, member i on 127.0.0.(i+1) when ``spread``."""

    workdir: Path
    size: int = 1
    spread: bool = False
    binary: str = "etcd"
    members: list[EtcdMember] = field(default_factory=list)

    def url(self, prefix: str = "/nodewatch") -> str:
        return "etcd://" + ",".join(m.endpoint for m in self.members) + prefix

    def start(self, wait: float = 20.0) -> EtcdCluster:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for i in range(self.size):
            host = f"127.0.0.{i + 1}" if self.spread else "127.0.0.1"
            self.members.append(EtcdMember(
                f"m{i}", host, free_port(host), free_port(host), self.workdir / f"m{i}.etcd",
                self.workdir / f"m{i}.log"))
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for m in self.members:
            argv = [self.binary, "--name", m.name, "--data-dir", str(m.data_dir),
                    "--listen-client-urls", f"http://{m.endpoint}",
                    "--advertise-client-urls", f"http://{m.endpoint}",
                    "--listen-peer-urls", m.peer_url,
                    "--initial-advertise-peer-urls", m.peer_url,
                    "--initial-cluster", initial, "--initial-cluster-state", "new",
                    "--initial-cluster-token", f"nodewatch-{self.workdir.name}",
                    # Fast elections on loopback: the loss of a member costs about a second.
                    "--heartbeat-interval", "50", "--election-timeout", "500",
                    "--logger", "zap", "--log-level", "warn"]
            with m.log_path.open("ab") as log:
                m.popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + wait
        for m in self.members:
            while not _port_open(m.host, m.client_port):
                if not m.alive() or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"etcd {m.name} did not start:\n"
                                       f"{m.log_path.read_text(errors='replace')[-2000:]}")
                time.sleep(0.05)
        self._wait_leader(deadline)
        return self

    def _wait_leader(self, deadline: float) -> None:
        """A cluster answers writes only once it elected a raft leader."""
        etcdctl = find_binary("etcdctl")
        if etcdctl is None:
            return
        endpoints = ",".join(m.endpoint for m in self.members if m.alive())
        while True:
            done = subprocess.run(
                [etcdctl, "--endpoints", endpoints, "--command-timeout", "1s",
                 "put", "/nodewatch-probe", "1"],
                capture_output=True, env={"ETCDCTL_API": "3"}, check=False)
            if done.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"etcd cluster has no leader: {done.stderr.decode()[-500:]}")
            time.sleep(0.1)

    def stop(self) -> None:
        for m in self.members:
            _stop(m.popen)

    def __enter__(self) -> EtcdCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class RedisServer:
    """One redis-server on 127.0.0.1 without persistence (``--save '' --appendonly no``)."""

    workdir: Path
    binary: str = "redis-server"
    port: int = 0
    popen: subprocess.Popen[bytes] | None = None

    def url(self, db: int = 0, prefix: str = "") -> str:
        query = f"?prefix={prefix}" if prefix else ""
        return f"redis://127.0.0.1:{self.port}/{db}{query}"

    def start(self, wait: float = 10.0) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        argv = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(self.workdir), "--protected-mode", "yes"]
        log_path = self.workdir / "redis.log"
        with log_path.open("ab") as log:
            self.popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + wait
        while not _port_open("127.0.0.1", self.port):
            if self.popen.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start:\n"
                                   f"{log_path.read_text(errors='replace')[-2000:]}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            _stop(self.popen)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
