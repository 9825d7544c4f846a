"""TLS end to end: a throwaway CA made with the openssl CLI, a coordinator on https that requires
client certificates, real agents and the CLI trusting the private CA, and one clear line for
every TLS setting that cannot work."""

from __future__ import annotations

import re
import ssl
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from nodewatch.cli.commands import main
from nodewatch.cli.processes import LocalCluster
from nodewatch.collect.agent import Agent
from nodewatch.config import AgentConfig, ConfigError, load_config
from nodewatch.tls import client_context, server_context
from tests.helpers import free_port, require_binary, wait_until

AGENT_TOKEN = "tls-agent-token-not-for-logs"


@dataclass(frozen=True)
class Pki:
    """Paths of a throwaway CA, a server cert for 127.0.0.1 and a client cert it signed."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed neither
    encrypted_key: Path


def _openssl(openssl: str, cwd: Path, *args: str) -> None:
    result = subprocess.run([openssl, *args], cwd=cwd, capture_output=True, text=True)
    assert result.returncode == 0, f"openssl {' '.join(args)}:\n{result.stderr}"


def _issue(openssl: str, d: Path, name: str, subject: str, extensions: str) -> None:
    """A P-256 key and a certificate for it, signed by ca.pem, valid for two days."""
    _openssl(openssl, d, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-subj", subject, "-keyout", f"{name}.key", "-out", f"{name}.csr")
    (d / f"{name}.ext").write_text(extensions)
    _openssl(openssl, d, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey",
             "ca.key", "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext",
             "-out", f"{name}.pem")


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    openssl = require_binary("openssl")
    d = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "other-ca"):
        _openssl(openssl, d, "req", "-x509", "-newkey", "ec", "-pkeyopt",
                 "ec_paramgen_curve:P-256", "-nodes", "-days", "2", "-subj",
                 f"/CN=nodewatch test {ca}", "-keyout", f"{ca}.key", "-out", f"{ca}.pem")
    _issue(openssl, d, "server", "/CN=127.0.0.1",
           "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    # The agent's certificate names its node (issue 14: the coordinator refuses a certificate
    # that names another node); the CLI presents the same one as an admin client.
    _issue(openssl, d, "client", "/CN=tls-1", "extendedKeyUsage=clientAuth\n")
    _openssl(openssl, d, "pkey", "-in", "client.key", "-aes256", "-passout", "pass:secret",
             "-out", "encrypted.key")
    return Pki(ca=d / "ca.pem", server_cert=d / "server.pem", server_key=d / "server.key",
               client_cert=d / "client.pem", client_key=d / "client.key",
               other_ca=d / "other-ca.pem", encrypted_key=d / "encrypted.key")


def harness_context(pki: Pki) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.load_cert_chain(pki.client_cert, pki.client_key)
    return context


CONFIG = """
[coordinator]
tls_cert = "{pki.server_cert}"
tls_key = "{pki.server_key}"
tls_client_ca = "{pki.ca}"
agent_token = "{token}"

[detection]
healthy_interval = "500ms"
unhealthy_interval = "200ms"
timeout = "500ms"
connect_timeout = "300ms"
startup_grace = "0"

[agent]
sample_interval = "1s"
agent_token = "{token}"
tls_ca = "{pki.ca}"
"""


@pytest.fixture(scope="module")
def cluster(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A coordinator on https requiring client certificates, and one agent presenting one."""
    workdir = tmp_path_factory.mktemp("tls-cluster")
    with LocalCluster(workdir=workdir, coordinator_listen=f"127.0.0.1:{free_port()}",
                      config_text=CONFIG.format(pki=pki, token=AGENT_TOKEN),
                      tls=harness_context(pki)) as c:
        c.start_coordinator()
        host = "127.0.9.1"
        c.start_agent("tls-1", f"{host}:{free_port(host)}", "--tls-cert", str(pki.client_cert),
                      "--tls-key", str(pki.client_key), "--heartbeat-interval", "500ms")
        yield c


def run(*args: str, **env: str) -> Result:
    clean = {"NODEWATCH_CA": None, "NODEWATCH_CLIENT_CERT": None, "NODEWATCH_CLIENT_KEY": None,
             "NODEWATCH_COORDINATOR": None, **env}
    return CliRunner().invoke(main, list(args), env=clean)  # type: ignore[arg-type]


def one_line(result: Result, exit_code: int) -> str:
    assert result.exit_code == exit_code, result.output
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    return lines[0]


# ---------------------------------------------------------------------- real processes


def test_agent_with_client_certificate_registers_and_is_polled_healthy(
    cluster: LocalCluster,
) -> None:
    assert cluster.url.startswith("https://")
    wait_until(lambda: (cluster.node("tls-1") or {}).get("health") == "healthy", timeout=15,
               message="tls-1 healthy over https")
    assert "with TLS, client certificates required" in cluster.coordinator.log()  # type: ignore[union-attr]

    def heartbeats() -> float:
        with urllib.request.urlopen(f"{cluster.url}/metrics", timeout=2,
                                    context=cluster.tls) as resp:
            text = resp.read().decode()
        match = re.search(r"^nodewatch_heartbeats_total (\S+)$", text, re.M)
        return float(match.group(1)) if match else 0.0

    wait_until(lambda: heartbeats() > 0, timeout=10, message="a heartbeat pushed over https")


def test_agent_without_client_certificate_cannot_register(cluster: LocalCluster) -> None:
    host = "127.0.9.2"
    agent = cluster.start_agent("no-cert", f"{host}:{free_port(host)}")
    wait_until(lambda: "requires a client certificate" in agent.log(), timeout=10,
               message="the agent's log saying why it cannot register")
    line = next(x for x in agent.log().splitlines() if "requires a client certificate" in x)
    assert "cannot register" in line and "tls_cert" in line and "Traceback" not in agent.log()
    assert cluster.node("no-cert") is None
    assert not [e for e in cluster.events() if e["node_id"] == "no-cert"]


def test_agent_whose_certificate_names_another_node_is_refused(cluster: LocalCluster,
                                                              pki: Pki) -> None:
    host = "127.0.9.4"
    agent = cluster.start_agent("tls-2", f"{host}:{free_port(host)}", "--tls-cert",
                                str(pki.client_cert), "--tls-key", str(pki.client_key))
    wait_until(lambda: "does not name node 'tls-2'" in agent.log(), timeout=10,
               message="the agent's log saying its certificate names another node")
    assert cluster.node("tls-2") is None and "Traceback" not in agent.log()
    assert (cluster.node("tls-1") or {}).get("address") != f"{host}"


def test_agent_trusting_another_ca_cannot_register(cluster: LocalCluster, pki: Pki) -> None:
    host = "127.0.9.3"
    agent = cluster.start_agent("wrong-ca", f"{host}:{free_port(host)}", "--tls-ca",
                                str(pki.other_ca), "--tls-cert", str(pki.client_cert),
                                "--tls-key", str(pki.client_key))
    wait_until(lambda: "cannot verify the TLS certificate" in agent.log(), timeout=10,
               message="the agent's log saying the coordinator is not trusted")
    assert "tls_ca" in agent.log() and cluster.node("wrong-ca") is None


def test_logs_hold_no_key_material_or_tokens(cluster: LocalCluster) -> None:
    wait_until(lambda: cluster.node("tls-1"), timeout=15, message="tls-1 registered")
    logs = [p.read_text(errors="replace") for p in cluster.workdir.glob("*.log")]
    assert len(logs) >= 2
    for text in logs:
        assert "PRIVATE KEY" not in text and AGENT_TOKEN not in text


# ---------------------------------------------------------------------- the CLI


def test_status_over_mutual_tls_prints_the_table(cluster: LocalCluster, pki: Pki) -> None:
    wait_until(lambda: cluster.node("tls-1"), timeout=15, message="tls-1 registered")
    result = run("status", "--coordinator", cluster.url, "--ca", str(pki.ca),
                 "--cert", str(pki.client_cert), "--key", str(pki.client_key))
    assert result.exit_code == 0, result.output
    assert "NODE" in result.output and "tls-1" in result.output
    # The same through the environment variables.
    result = run("status", "--json", NODEWATCH_COORDINATOR=cluster.url,
                 NODEWATCH_CA=str(pki.ca), NODEWATCH_CLIENT_CERT=str(pki.client_cert),
                 NODEWATCH_CLIENT_KEY=str(pki.client_key))
    assert result.exit_code == 0, result.output
    assert '"tls-1"' in result.output


def test_status_without_ca_is_one_line_about_certificate_verification(
    cluster: LocalCluster, pki: Pki,
) -> None:
    line = one_line(run("status", "--coordinator", cluster.url, "--cert",
                        str(pki.client_cert), "--key", str(pki.client_key)), 1)
    assert line.startswith("nodewatch: cannot verify the TLS certificate of the coordinator")
    assert "--ca" in line and "NODEWATCH_CA" in line


def test_status_without_client_certificate_is_one_line(cluster: LocalCluster,
                                                       pki: Pki) -> None:
    line = one_line(run("status", "--coordinator", cluster.url, "--ca", str(pki.ca)), 1)
    assert "requires a client certificate" in line and "--cert" in line


def test_events_and_drain_take_the_same_options(cluster: LocalCluster, pki: Pki) -> None:
    wait_until(lambda: cluster.node("tls-1"), timeout=15, message="tls-1 registered")
    tls = ("--coordinator", cluster.url, "--ca", str(pki.ca), "--cert", str(pki.client_cert),
           "--key", str(pki.client_key))
    result = run("events", *tls)
    assert result.exit_code == 0 and "tls-1" in result.output, result.output
    result = run("drain", "tls-1", *tls, "--reason", "tls test")
    assert result.exit_code == 0 and "drained" in result.output, result.output
    assert run("undrain", "tls-1", *tls).exit_code == 0


@pytest.mark.parametrize("flags, expected", [
    (["--ca", "{d}/missing.pem"], "--ca (NODEWATCH_CA): cannot read {d}/missing.pem "
                                  "(no such file or directory); expected a PEM CA bundle"),
    (["--ca", "{ca}", "--cert", "{cert}", "--key", "{wrong_key}"],
     "--key (NODEWATCH_CLIENT_KEY): {wrong_key} does not match the certificate in {cert}"),
    (["--key", "{key}"], "--key (NODEWATCH_CLIENT_KEY): set without --cert"),
])
def test_cli_tls_files_that_cannot_work_are_one_line(pki: Pki, flags: list[str],
                                                     expected: str) -> None:
    names = {"d": pki.ca.parent, "ca": pki.ca, "cert": pki.client_cert, "key": pki.client_key,
             "wrong_key": pki.server_key}
    args = [flag.format(**names) for flag in flags]
    line = one_line(run("status", "--coordinator", "https://127.0.0.1:1", *args), 2)
    assert line.startswith("nodewatch: " + expected.format(**names)), line


# ---------------------------------------------------------------------- configuration


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "nodewatch.toml"
    path.write_text(text)
    return path


def test_coordinator_key_mismatch_stops_start_up_with_one_line(tmp_path: Path,
                                                               pki: Pki) -> None:
    path = _toml(tmp_path, f'[coordinator]\ntls_cert = "{pki.server_cert}"\n'
                           f'tls_key = "{pki.client_key}"\n')
    line = one_line(run("coordinator", "--config", str(path)), 2)
    assert line == (f"nodewatch: {path}: coordinator.tls_key: {pki.client_key} does not match "
                    f"the certificate in {pki.server_cert} (coordinator.tls_cert); expected "
                    "that certificate's private key")


def test_agent_missing_ca_stops_start_up_with_one_line(tmp_path: Path) -> None:
    path = _toml(tmp_path, f'[agent]\ntls_ca = "{tmp_path}/nope.pem"\n')
    line = one_line(run("agent", "--node-id", "a-1", "--config", str(path)), 2)
    assert line == (f"nodewatch agent: {path}: agent.tls_ca: cannot read {tmp_path}/nope.pem "
                    "(no such file or directory); expected a PEM CA bundle")


@pytest.mark.parametrize("table, key, value, expected", [
    ("agent", "tls_ca", "{d}", "agent.tls_ca: cannot read {d} (is a directory)"),
    ("agent", "tls_ca", "{key}", "agent.tls_ca: {key} holds no PEM certificate; expected a "
                                 "PEM CA bundle"),
    ("agent", "tls_cert", "{cert}", "agent.tls_cert: {cert} holds no private key; expected "
                                    "agent.tls_key"),
    ("agent", "tls_key", "{key}", "agent.tls_key: set without agent.tls_cert"),
    ("coordinator", "tls_client_ca", "{ca}", "coordinator.tls_client_ca: requires "
                                             "coordinator.tls_cert"),
    ("coordinator", "tls_cert", "{key}", "coordinator.tls_cert: {key} holds no PEM "
                                         "certificate; expected a PEM certificate"),
])
def test_tls_settings_that_cannot_work_name_file_key_and_expectation(
    tmp_path: Path, pki: Pki, table: str, key: str, value: str, expected: str,
) -> None:
    names = {"d": pki.ca.parent, "ca": pki.ca, "cert": pki.client_cert, "key": pki.client_key}
    path = _toml(tmp_path, f'[{table}]\n{key} = "{value.format(**names)}"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: {expected.format(**names)}"), str(info.value)
    load_config(path, check_files=False)  # thresholds-only tools (simulate) do not open them


def test_encrypted_key_is_refused_without_prompting(pki: Pki) -> None:
    with pytest.raises(ConfigError, match="encrypted private key; expected an unencrypted"):
        client_context(str(pki.ca), str(pki.client_cert), str(pki.encrypted_key))


def test_in_process_agent_checks_its_tls_files_at_construction(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^agent\.tls_ca: cannot read"):
        Agent(AgentConfig(node_id="a-1", tls_ca=str(tmp_path / "nope.pem"),
                          state_dir=str(tmp_path)))


def test_server_context_is_tls12_or_newer_and_requires_client_certificates(pki: Pki) -> None:
    context = server_context(str(pki.server_cert), str(pki.server_key), str(pki.ca))
    assert context is not None
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_REQUIRED
    open_context = server_context(str(pki.server_cert), str(pki.server_key), "")
    assert open_context is not None and open_context.verify_mode == ssl.CERT_NONE
    assert server_context("", "", "") is None
    assert client_context("", "", "") is None


def test_status_with_a_certificate_the_coordinator_refuses_is_one_line(
    cluster: LocalCluster, pki: Pki,
) -> None:
    # The server certificate has no clientAuth usage: the coordinator refuses it as a client.
    line = one_line(run("status", "--coordinator", cluster.url, "--ca", str(pki.ca), "--cert",
                        str(pki.server_cert), "--key", str(pki.server_key)), 1)
    assert "rejected the client certificate" in line and "tls_client_ca" in line
