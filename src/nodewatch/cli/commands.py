"""The ``nodewatch`` command line."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NoReturn

import click

from nodewatch.cli.render import (
    event_line,
    make_console,
    nodes_table,
    summary_line,
    suspicion_table,
)
from nodewatch.protocol import VERSION

if TYPE_CHECKING:
    from nodewatch.cli.client import Client

__all__ = ["COORDINATOR_HELP", "LOG_FORMAT_HELP", "agent_command", "completion", "coordinator",
           "demo", "events", "main", "sd", "simulate", "status", "tls_options"]

LOG_FORMAT_HELP = ("text, json (one object a line) or auto (json unless stderr is a terminal) "
                   "[NODEWATCH_LOG_FORMAT, else the config's log_format, else text]")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(VERSION, prog_name="nodewatch")
def main() -> None:
    """nodewatch keeps a cluster's view of its nodes true."""


@main.command()
@click.option("--listen", help="HOST:PORT to serve the API on [127.0.0.1:7300]")
@click.option("--store", help="sqlite:///path, etcd://host:2379/prefix or redis://host:6379/0")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="TOML configuration file")
@click.option("--log-level", default="info",
              type=click.Choice(["debug", "info", "warning", "error"]), show_default=True)
@click.option("--log-format", type=click.Choice(["text", "json", "auto"]), help=LOG_FORMAT_HELP)
def coordinator(listen: str | None, store: str | None, config_path: str | None,
                log_level: str, log_format: str | None) -> None:
    """Watch nodes, keep their state, respond to failures, serve the API."""
    import asyncio
    import os

    from nodewatch.config import ConfigError, load_config
    from nodewatch.coordinator.run import serve
    from nodewatch.logs import configure_logging, resolve_format

    overrides = {
        "coordinator.listen": listen,
        "coordinator.store": store,
        "coordinator.admin_token": os.environ.get("NODEWATCH_ADMIN_TOKEN") or None,
        "coordinator.agent_token": os.environ.get("NODEWATCH_AGENT_TOKEN") or None,
    }
    try:
        cfg = load_config(config_path, overrides)
        fmt = resolve_format(log_format, cfg.coordinator.log_format)
    except ConfigError as exc:
        click.echo(f"nodewatch: {exc}", err=True)
        raise SystemExit(2) from None
    cc = cfg.coordinator
    configure_logging(log_level, fmt, secrets=[*cc.admin_tokens, *cc.agent_tokens,
                                                *(a.secret for a in cfg.actions)])
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    try:
        asyncio.run(serve(cfg))
    except OSError as exc:
        click.echo(f"nodewatch: cannot serve on {cfg.coordinator.listen}: {exc.strerror}",
                   err=True)
        raise SystemExit(1) from None
    except (ConfigError, ValueError) as exc:
        click.echo(f"nodewatch: {exc}", err=True)
        raise SystemExit(2) from None


@main.command("agent")
@click.option("--node-id", help="Unique node id, [A-Za-z0-9._-]{1,128}.")
@click.option("--listen", help="HOST:PORT to serve the agent API on (default 0.0.0.0:7301).")
@click.option("--advertise", help="HOST:PORT the coordinator should use to reach this agent.")
@click.option("--coordinator", help="Coordinator URL to register with, e.g. http://10.0.0.1:7300; "
              "with shared coordinators, several, comma-separated.")
@click.option("--state-dir", help="Directory for the persisted incarnation and seq.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="TOML config file; flags override it.")
@click.option("--sample-interval", help="Sampling interval, 1s-15s (default 5s).")
@click.option("--heartbeat-interval", help="Push heartbeats this often (0 = pull only).")
@click.option("--store", help="etcd://host:2379/prefix: publish liveness under an etcd lease.")
@click.option("--tls-ca", help="CA bundle that signed an https coordinator's certificate.")
@click.option("--tls-cert", help="Client certificate (PEM) for a coordinator that requires one.")
@click.option("--tls-key", help="Private key (PEM) of --tls-cert.")
@click.option("--log-format", type=click.Choice(["text", "json", "auto"]), help=LOG_FORMAT_HELP)
def agent_command(node_id: str | None, listen: str | None, advertise: str | None,
                  coordinator: str | None, state_dir: str | None, config_path: str | None,
                  sample_interval: str | None, heartbeat_interval: str | None,
                  store: str | None, tls_ca: str | None, tls_cert: str | None,
                  tls_key: str | None, log_format: str | None) -> None:
    """Run the node agent (token from NODEWATCH_AGENT_TOKEN or [agent] agent_token)."""
    from nodewatch.collect.run import load_agent_config, run_agent
    from nodewatch.config import ConfigError
    from nodewatch.logs import resolve_format

    try:
        cfg = load_agent_config(config_path, {
            "node_id": node_id, "listen": listen, "advertise": advertise,
            "coordinator": coordinator, "state_dir": state_dir,
            "sample_interval": sample_interval, "heartbeat_interval": heartbeat_interval,
            "store": store, "tls_ca": tls_ca, "tls_cert": tls_cert, "tls_key": tls_key,
        })
        fmt = resolve_format(log_format, cfg.log_format)
    except ConfigError as exc:
        click.echo(f"nodewatch agent: {exc}", err=True)
        raise SystemExit(2) from None
    raise SystemExit(run_agent(cfg, fmt))


# ---------------------------------------------------------------------- client commands
#
# Every client command turns a failure into one line on stderr and exit status 1; click's
# own usage errors keep exit status 2. Nothing here ever shows a traceback for a network,
# token or unknown-node problem.

COORDINATOR_HELP = ("Coordinator URL [NODEWATCH_COORDINATOR, else http://127.0.0.1:7300]; "
                    "admin token from NODEWATCH_ADMIN_TOKEN.")


def tls_options(command: Any) -> Any:
    """--ca / --cert / --key for an https coordinator (environment variables as fallback)."""
    for flag, env, text in (
        ("--key", "NODEWATCH_CLIENT_KEY", "Private key (PEM) of --cert."),
        ("--cert", "NODEWATCH_CLIENT_CERT", "Client certificate (PEM), when the coordinator "
                                            "requires one."),
        ("--ca", "NODEWATCH_CA", "CA bundle (PEM) that signed the coordinator's certificate."),
    ):
        command = click.option(flag, metavar="FILE", help=f"{text} [{env}]")(command)
    return command
def _fail(message: str) -> NoReturn:
    click.echo(f"nodewatch: {message}", err=True)
    raise SystemExit(1)


def _client(coordinator: str | None, ca: str | None = None, cert: str | None = None,
            key: str | None = None) -> Client:
    """The coordinator client; a TLS file that cannot work is one line and exit status 2."""
    from nodewatch.cli.client import Client
    from nodewatch.config import ConfigError

    try:
        return Client.from_env(coordinator, ca=ca, cert=cert, key=key)
    except ConfigError as exc:
        click.echo(f"nodewatch: {exc}", err=True)
        raise SystemExit(2) from None


@main.command()
@click.option("--coordinator", help=COORDINATOR_HELP)
@tls_options
@click.option("--json", "as_json", is_flag=True, help="Print the API's JSON instead of a table.")
def status(coordinator: str | None, ca: str | None, cert: str | None, key: str | None,
           as_json: bool) -> None:
    """Show every node: health, self-reported status, admin state, load."""
    import json
    import time

    import msgspec

    from nodewatch.cli.client import ClientError

    client = _client(coordinator, ca, cert, key)
    try:
        nodes = client.nodes()
    except ClientError as exc:
        _fail(str(exc))
    if as_json:
        click.echo(json.dumps({"nodes": msgspec.to_builtins(nodes)}, indent=2, sort_keys=True))
        return
    console = make_console()
    console.print(nodes_table(nodes, time.time()))
    console.print(f"[dim]{summary_line(nodes)}[/]")


def _node_command(name: str, verb: str, help_text: str) -> None:
    """Register one operator command (drain, undrain, approve, revoke, remove) on the
    group."""

    @main.command(name, help=help_text)
    @click.argument("node_id")
    @click.option("--coordinator", help=COORDINATOR_HELP)
    @tls_options
    def command(node_id: str, coordinator: str | None, ca: str | None, cert: str | None,
                key: str | None, reason: str = "", address: str = "") -> None:
        from nodewatch.cli.client import ClientError

        client = _client(coordinator, ca, cert, key)
        try:
            result = client.command(name, node_id, reason, address)
        except ClientError as exc:
            _fail(str(exc))
        if name == "remove":
            click.echo(f"{node_id} removed")
            return
        node = result.node
        if node is None:
            _fail(f"the coordinator did not say what became of {node_id}")
        click.echo(f"{node_id} {verb}: health {node.health}, status "
                   f"{node.node_status}, admin {node.admin}, schedulable "
                   f"{'yes' if node.schedulable else 'no'}")

    if name == "drain":
        click.option("--reason", default="", help="Why; kept in the drained event.")(command)
    if name == "approve":
        click.option("--reason", default="", help="Why; kept in the approved event.")(command)
        click.option("--address", default="", metavar="HOST:PORT", help=(
            "Re-enrol NODE from its pending claim at this address (a claim is re-enrolled only "
            "when named); a newer claim from elsewhere is refused, not approved."))(command)


_node_command("drain", "drained", "Take NODE out softly: no new work, running work finishes.")
_node_command("undrain", "undrained", "Return a drained NODE to service.")
_node_command("approve", "approved", "Approve a NODE held for review after a suspicious rejoin, "
              "or its pending re-enrolment (a claim refused for want of its credential).")
_node_command("revoke", "credential revoked", "Revoke NODE's credential: refused from now on, "
              "NODE re-enrols into review on its next registration.")
_node_command("remove", "removed", "Forget NODE (it registers again if its agent still runs).")


@main.command()
@click.option("--coordinator", help=COORDINATOR_HELP)
@tls_options
@click.option("--follow", "-f", is_flag=True, help="Keep printing new events as they happen.")
@click.option("--last", "last", default=20, show_default=True, type=click.IntRange(0, 100_000),
              help="How many past events to print first.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def events(coordinator: str | None, ca: str | None, cert: str | None, key: str | None,
           follow: bool, last: int, as_json: bool) -> None:
    """Print recent events; with --follow, stream new ones (Server-Sent Events)."""
    import collections
    import json

    import msgspec

    from nodewatch.cli.client import ClientError, EventInfo

    console = make_console()

    def show(event: EventInfo) -> None:
        if as_json:
            click.echo(json.dumps(msgspec.to_builtins(event), sort_keys=True))
        else:
            console.print(event_line(event))

    client = _client(coordinator, ca, cert, key)
    backlog: collections.deque[EventInfo] = collections.deque(maxlen=max(last, 1))
    after: str | None = None
    try:
        # Page through the retained events; bounded by what the store keeps (events_retained).
        for _ in range(1000):
            page = client.events(after=after, limit=1000)
            backlog.extend(page.events)
            if not page.events:
                after = page.last_id or after
                break
            after = page.events[-1].id
        for event in list(backlog)[-last:] if last else []:
            show(event)
        if not follow:
            return
        for event in client.stream_events(after=after):
            show(event)
    except ClientError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        return


@main.command()
@click.option("--file", "path", required=True, type=click.Path(dir_okay=False),
              help="Where to write the target groups (JSON; Prometheus' file_sd_configs).")
@click.option("--watch", default=None, metavar="INTERVAL",
              help="Rewrite the file every INTERVAL (1s-1h, e.g. 30s) until Ctrl-C; a failed "
                   "fetch keeps the last file.")
@click.option("--schedulable", type=click.Choice(["true", "false"]),
              help="Only nodes that may (not) take new work.")
@click.option("--health", help="Comma-separated health values, e.g. healthy,suspect.")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE",
              help="Only nodes with this label; repeatable.")
@click.option("--coordinator", help=COORDINATOR_HELP)
@tls_options
def sd(path: str, watch: str | None, schedulable: str | None, health: str | None,
       labels: tuple[str, ...], coordinator: str | None, ca: str | None, cert: str | None,
       key: str | None) -> None:
    """Write the nodes as Prometheus file_sd targets (the same as GET /v1/sd/prometheus).

    The file is replaced atomically (a temporary file, then a rename) and only when it
    changes, so Prometheus never reads half a file."""
    from pathlib import Path

    from nodewatch.cli.client import ClientError
    from nodewatch.cli.sd import keep_written, write_targets
    from nodewatch.config import parse_duration

    query = [("schedulable", schedulable)] if schedulable else []
    query += [("health", health)] if health else []
    query += [("label", label) for label in labels]
    client = _client(coordinator, ca, cert, key)
    target = Path(path)
    if watch is None:
        try:
            groups = client.prometheus_targets(query)
            write_targets(target, groups)
        except ClientError as exc:
            _fail(str(exc))
        except OSError as exc:
            _fail(f"cannot write {path}: {exc.strerror or exc}")
        click.echo(f"{path}: {len(groups)} targets")
        return
    try:
        interval = float(parse_duration(watch))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--watch") from None
    if not 1.0 <= interval <= 3600.0:
        raise click.BadParameter("expected an interval between 1s and 1h", param_hint="--watch")
    raise SystemExit(keep_written(target, lambda: client.prometheus_targets(query), interval,
                                  lambda line: click.echo(line, err=True)))


@main.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script for SHELL.

    bash: eval "$(nodewatch completion bash)" in ~/.bashrc; zsh: the same with zsh in
    ~/.zshrc. (Click's own: _NODEWATCH_COMPLETE=bash_source nodewatch.)"""
    from click.shell_completion import get_completion_class

    cls = get_completion_class(shell)
    assert cls is not None  # every choice is one of click's shells
    click.echo(cls(main, {}, "nodewatch", "_NODEWATCH_COMPLETE").source())


@main.command()
@click.option("--nodes", default=5, show_default=True, type=click.IntRange(1, 50),
              help="How many local agents to start.")
@click.option("--listen", default="127.0.0.1:7300", show_default=True,
              help="Loopback HOST:PORT for the coordinator and dashboard.")
@click.option("--duration", default=None,
              help="Stop by itself after this long (e.g. 30s, 5m); default: until Ctrl-C.")
@click.option("--dir", "workdir", default="./nodewatch-data/demo", show_default=True,
              type=click.Path(file_okay=False), help="Where demo state and logs go.")
@click.option("--log-format", type=click.Choice(["text", "json", "auto"]),
              help="The coordinator's and agents' log format (their logs in --dir): "
                   + LOG_FORMAT_HELP.replace(", else the config's log_format", ""))
def demo(nodes: int, listen: str, duration: str | None, workdir: str,
         log_format: str | None) -> None:
    """Run a coordinator and N agents locally, with a fast detection profile, to try things.

    Type `help` at the prompt (or pipe commands on stdin) to kill, hang, degrade or load a
    node and watch detection and recovery live on the dashboard.
    """
    from pathlib import Path

    from nodewatch.cli.demo import DemoError, run_demo
    from nodewatch.config import parse_duration

    seconds: float | None = None
    if duration is not None:
        try:
            seconds = float(parse_duration(duration))
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--duration") from None
    try:
        raise SystemExit(run_demo(nodes, listen, Path(workdir), seconds,
                                  log_format=log_format))
    except DemoError as exc:
        _fail(str(exc))


@main.command()
@click.option("--nodes", default=None, type=click.IntRange(1, 2_000_000),
              help="How many simulated nodes [10000; gray, fleet-errors: 100].")
@click.option("--duration", default=None,
              help="Simulated (virtual) time, e.g. 10m, 1h [1h; coordinator-loss, "
                   "coordinator-join: 3m a run].")
@click.option("--scenario", default="crash", show_default=True,
              type=click.Choice(["crash", "hang", "flap", "slow", "partition",
                                 "slow-coordinator", "jitter", "gray", "fleet-errors",
                                 "coordinator-loss", "coordinator-join"]),
              help="The scripted faults (jitter: pushing nodes with heavy-tailed delays and "
                   "pauses, judged by the fixed deadline and by phi, side by side; gray, "
                   "fleet-errors: gray failures, see README; coordinator-loss: one of "
                   "--coordinators killed at a random moment while nodes crash around it; "
                   "coordinator-join: one added, no node fails).")
@click.option("--runs", default=None, type=click.IntRange(1, 100_000),
              help="gray / fleet-errors: seeded runs, one fault each [50]; coordinator-loss "
                   "/ coordinator-join: seeded runs, one kill or join each [10].")
@click.option("--coordinators", default=None, type=click.IntRange(1, 256),
              help="Coordinators sharing the nodes by shares (before a join or a kill) "
                   "[1; coordinator-loss, coordinator-join: 3].")
@click.option("--watch-delay", default="5ms", show_default=True,
              help="Several coordinators: from an etcd change to a watcher seeing it.")
@click.option("--fraction", type=click.FloatRange(0.0, 1.0), default=None,
              help="Share of nodes the scenario hits (crash/hang/flap/slow/partition/jitter).")
@click.option("--seed", default=1, show_default=True, type=int, help="Random seed.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="TOML file with the [detection], [guard], [budget] thresholds to try.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def simulate(nodes: int | None, duration: str | None, scenario: str, runs: int | None,
             coordinators: int | None, watch_delay: str, fraction: float | None, seed: int,
             config_path: str | None, as_json: bool) -> None:
    """Run the real detection core against N simulated nodes on a virtual clock.

    Prints detection latency (fault to `unhealthy`), false positives (alive nodes confirmed
    unhealthy) and the events the core emitted; nothing touches the network. With several
    coordinators, also the takeover: from the kill (or join) until every node of the moved
    shares is watched again, and the longest time a node was watched by nobody or by two.
    """
    import json

    from nodewatch.config import ConfigError, load_config, parse_duration
    from nodewatch.detect.simulate import (
        COORDINATOR_SCENARIOS,
        compare_suspicion,
        settings_from_config,
        simulate_coordinators,
    )
    from nodewatch.detect.simulate import simulate as run_simulation

    shared = scenario in COORDINATOR_SCENARIOS
    try:
        seconds = float(parse_duration(duration or ("3m" if shared else "1h")))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--duration") from None
    try:
        delay = float(parse_duration(watch_delay))
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--watch-delay") from None
    if scenario in ("gray", "fleet-errors"):
        if coordinators not in (None, 1):
            raise click.BadParameter(f"{scenario} runs one coordinator",
                                     param_hint="--coordinators")
        _simulate_gray(scenario, nodes or 100, runs or 50, seed, config_path, as_json)
        return
    coordinators = coordinators or (3 if shared else 1)
    if scenario == "coordinator-loss" and coordinators < 2:
        raise click.BadParameter("coordinator-loss needs at least 2 (one to take over)",
                                 param_hint="--coordinators")
    nodes = nodes or 10_000
    try:
        cfg = load_config(config_path, check_files=False)  # thresholds only: no TLS files
        settings = settings_from_config(cfg, nodes=nodes, duration=seconds, scenario=scenario,
                                        fraction=fraction, seed=seed, coordinators=coordinators,
                                        watch_delay=delay)
    except (ConfigError, ValueError) as exc:
        _fail(str(exc))
    if shared:
        shared_result = simulate_coordinators(settings, runs or 10).to_json()
        if as_json:
            click.echo(json.dumps(shared_result, sort_keys=True))
        else:
            _print_takeover(scenario, shared_result)
        return
    compared: dict[str, dict[str, Any]] = {}
    if scenario == "jitter":
        compared = {k: r.to_json() for k, r in compare_suspicion(settings).items()}
        result = dict(compared[settings.policy.suspicion], suspicion=compared)
    else:
        result = run_simulation(settings).to_json()
    if as_json:
        click.echo(json.dumps(result, sort_keys=True))
        return
    console = make_console()
    if compared:
        fixed = compared["fixed"]
        console.print(f"[bold]jitter[/]: {fixed['nodes']} nodes pushing every "
                      f"{fixed['profile']['heartbeat_interval']:g}s, "
                      f"{settings.main_fraction:.0%} jittery, {seconds:g}s simulated twice in "
                      f"{sum(r['wall_s'] for r in compared.values()):.1f}s")
        console.print(suspicion_table(compared))
        return

    def secs(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}s"

    console.print(f"[bold]{scenario}[/]: {result['nodes']} nodes, {seconds:g}s simulated in "
                  f"{result['wall_s']:.1f}s ({result['checks']} checks, "
                  f"{result['heartbeats']} heartbeats)")
    console.print(f"detection  p50 {secs(result['detection_p50'])}  p99 "
                  f"{secs(result['detection_p99'])}  max {secs(result['detection_max'])}  "
                  f"({result['detected']} of {result['faults']} faults confirmed, "
                  f"{result['missed']} missed)")
    style = "green" if result["false_positives"] == 0 else "red"
    console.print(f"false positives  [{style}]{result['false_positives']}[/]")
    console.print("events  " + ", ".join(f"{k} {v}" for k, v in result["events"].items()))
    if result["held"]:
        console.print("held  " + ", ".join(f"{k}: {v}" for k, v in result["held"].items()))
    if result["guard_on_s"]:
        console.print(f"guard on for {result['guard_on_s']:.0f}s")
    if "coordination" in result:
        c = result["coordination"]
        console.print(f"{c['coordinators']} coordinators, shares held  " + ", ".join(
            f"{name} {held}" for name, held in c["shares_held"].items())
            + f"; longest watched by nobody {c['unwatched_max']:.3f}s, by two "
              f"{c['doubly_watched_max']:.3f}s")


def _print_takeover(scenario: str, result: dict[str, Any]) -> None:
    """The figures of ``coordinator-loss`` / ``coordinator-join`` over their runs."""
    console = make_console()
    c = result["coordination"]

    def secs(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}s" if value < 1 else f"{value:.1f}s"

    def spread(stats: dict[str, Any]) -> str:
        return (f"p50 {secs(stats['p50'])}  p99 {secs(stats['p99'])}  max "
                f"{secs(stats['max'])}")

    kill = c["event"] == "kill"
    console.print(f"[bold]{scenario}[/]: {result['nodes']} nodes, {c['coordinators']} "
                  f"coordinators {'(one killed)' if kill else '(+1 joins)'}, {c['runs']} runs "
                  f"of {result['simulated_s']:g}s simulated in {result['wall_s']:.1f}s "
                  f"(leader_ttl {c['leader_ttl']:g}s, watch delay {c['watch_delay'] * 1000:g}ms)")
    moved = c["shares_moved"]
    console.print(f"shares moved  {moved['mean']:g} of 256 a run (min {moved['min']}, max "
                  f"{moved['max']}), {c['nodes_moved_mean']} nodes")
    if kill:
        console.print(f"lease expired after the kill  {spread(c['lease_expired_after'])}")
    console.print(f"shares claimed after the {'kill' if kill else 'join'}  "
                  f"{spread(c['claimed_after'])}")
    bound = c["leader_ttl"] + c["detection_window"]
    console.print(f"every node of the moved shares watched again after  "
                  f"{spread(c['watched_again_after'])}  (bound: leader_ttl + one detection "
                  f"window = {bound:g}s)")
    console.print(f"longest watched by nobody  {secs(c['unwatched_max'])};  by two  "
                  f"{secs(c['doubly_watched_max'])}")
    if kill:
        for label, key in (("near the takeover", "detection_near"),
                           ("far from it", "detection_far")):
            stats = c[key]
            console.print(f"crash detection, deaths {label}  {spread(stats)}  "
                          f"({stats['n']} deaths)")
        console.print(f"crashes  {result['detected']} of {result['faults']} confirmed, "
                      f"{result['missed']} missed; confirmations per crashed node at most "
                      f"{c['confirmations_max']}")
    style = "green" if result["false_positives"] == 0 else "red"
    console.print(f"false confirmations  [{style}]{result['false_positives']}[/]")
    console.print("events  " + (", ".join(f"{k} {v}" for k, v in result["events"].items())
                                or "none"))


def _simulate_gray(scenario: str, nodes: int, runs: int, seed: int, config_path: str | None,
                   as_json: bool) -> None:
    """The gray-failure scenarios: time from the start of a gray failure to unschedulable,
    beside Panorama's 7 s; ejections in fleet-errors (all false)."""
    import json

    from nodewatch.config import ConfigError, load_config
    from nodewatch.detect.policy import Policy
    from nodewatch.detect.simulate_gray import PANORAMA_S, GraySettings, simulate_gray

    try:
        cfg = load_config(config_path, check_files=False)
        settings = GraySettings(policy=Policy.from_config(cfg), scenario=scenario,
                                nodes=nodes, runs=runs, seed=seed)
    except (ConfigError, ValueError) as exc:
        _fail(str(exc))
    result = simulate_gray(settings).to_json()
    if as_json:
        click.echo(json.dumps(result, sort_keys=True))
        return
    console = make_console()

    def secs(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}s"

    console.print(f"[bold]{scenario}[/]: {result['nodes']} nodes x {runs} runs, "
                  f"{result['simulated_s']:g}s simulated in {result['wall_s']:.1f}s")
    if scenario == "gray":
        console.print(f"time to unschedulable  p50 {secs(result['detection_p50'])}  p99 "
                      f"{secs(result['detection_p99'])}  max {secs(result['detection_max'])}"
                      f"  (Panorama: {PANORAMA_S:g}s; {result['detected']} of "
                      f"{result['faults']} gray nodes taken out, {result['missed']} missed)")
    style = "green" if result["false_positives"] == 0 else "red"
    console.print(f"ejections of nodes in line with their group  "
                  f"[{style}]{result['false_positives']}[/]")
    console.print("events  " + (", ".join(f"{k} {v}" for k, v in result["events"].items())
                                or "none"))

