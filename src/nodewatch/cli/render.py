"""How the CLI and the demo show nodes and events: rich tables, one-line events, summaries."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nodewatch.cli.client import EventInfo, NodeInfo

__all__ = ["event_line", "make_console", "nodes_table", "summary_line", "suspicion_table"]

_HEALTH_STYLE = {"healthy": "green", "suspect": "yellow", "unhealthy": "red", "dead": "red dim",
                 "unknown": "dim"}
_EVENT_STYLE = {"healthy": "green", "recovered": "green", "approved": "green",
                "undrained": "green", "registered": "cyan", "suspect": "yellow",
                "degraded": "yellow", "drained": "yellow", "review": "magenta",
                "unhealthy": "red", "dead": "red", "removed": "red", "guard_on": "red",
                "guard_off": "green", "action_failed": "red", "outlier": "red",
                "outlier_cleared": "green", "outlier_held": "yellow",
                "outlier_hold": "yellow", "outlier_hold_off": "green"}


def make_console() -> Any:
    """A rich console; wide when piped so tables stay whole in logs and scripts."""
    import sys

    from rich.console import Console

    return Console(highlight=False, width=None if sys.stdout.isatty() else 200)


def _fmt_num(value: object, digits: int = 1) -> str:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return f"{value:.{digits}f}".rstrip("0").rstrip(".") if digits else f"{value:.0f}"
    return "-"


def _ago(ts: float, now: float) -> str:
    if not ts:
        return "never"
    delta = max(0.0, now - ts)
    if delta < 60:
        return f"{delta:.0f}s ago"
    if delta < 3600:
        return f"{delta / 60:.0f}m ago"
    return f"{delta / 3600:.1f}h ago"


def event_line(event: EventInfo, markup: bool = True) -> str:
    """One human line per event; shared by ``events`` and the demo's live log."""
    import datetime as _dt

    when = _dt.datetime.fromtimestamp(event.ts).strftime("%H:%M:%S")
    kind = event.kind
    change = ""
    if event.from_ or event.to:
        change = f" {event.from_ or '-'} -> {event.to or '-'}"
    reason = f"  {event.reason}" if event.reason else ""
    node = event.node_id or "(cluster)"
    if not markup:
        return f"{when} {node:<12} {kind:<13}{change}{reason}"
    from rich.markup import escape

    style = _EVENT_STYLE.get(kind, "white")
    return (f"[dim]{when}[/] {escape(str(node)):<12} [{style}]{kind:<13}[/]"
            f"{escape(change)}[dim]{escape(reason)}[/]")


def nodes_table(nodes: list[NodeInfo], now: float) -> Any:
    """The ``status`` table: one row per node, coloured by health."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("NODE", "ADDRESS", "HEALTH", "STATUS", "ADMIN", "SCHED", "CPU%", "MEM%",
                   "QPS", "PENDING", "LAST SEEN", "REASONS"):
        numeric = column in {"CPU%", "MEM%", "QPS", "PENDING"}
        table.add_column(column, justify="right" if numeric else "left",
                         no_wrap=column != "REASONS")
    for node in nodes:
        health, status, admin = node.health, node.node_status, node.admin
        identity = node.identity
        claim = identity.pending_claim or identity.reenrol_from if identity else None
        system, load = node.system, node.load
        table.add_row(
            escape(node.node_id), escape(node.address),
            f"[{_HEALTH_STYLE.get(health, 'white')}]{health}[/]",
            status if status == "ok" else f"[yellow]{status}[/]",
            (admin if admin == "active" else f"[magenta]{admin}[/]")
            + (f" [magenta]claim {escape(claim)}[/]" if claim else ""),
            ("[green]yes[/]" if node.schedulable else "[red]no[/]")
            + (" [red]outlier[/]" if node.outlier is not None else ""),
            _fmt_num(system.get("cpu_percent")), _fmt_num(system.get("mem_percent")),
            _fmt_num(load.get("qps")), _fmt_num(load.get("pending_tasks"), 0),
            _ago(node.last_seen, now),
            escape("; ".join(node.reasons)),
        )
    return table


def suspicion_table(compared: dict[str, dict[str, Any]]) -> Any:
    """``simulate --scenario jitter``: one row per judgement of pushed heartbeats (fixed, phi)
    on the same nodes, so that false positives and detection time read side by side."""
    from rich.table import Table

    def secs(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}s"

    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("SUSPICION", "FALSE CONFIRMATIONS", "FALSE SUSPICIONS", "DETECTION P50",
                   "P99", "MAX", "CRASHES CONFIRMED", "POLLS"):
        table.add_column(column, justify="left" if column == "SUSPICION" else "right")
    for name, r in compared.items():
        style = "green" if r["false_positives"] == 0 else "red"
        table.add_row(name, f"[{style}]{r['false_positives']}[/]", str(r["false_suspicions"]),
                      secs(r["detection_p50"]), secs(r["detection_p99"]),
                      secs(r["detection_max"]), f"{r['detected']}/{r['faults']}",
                      str(r["checks"]))
    return table


def summary_line(nodes: list[NodeInfo]) -> str:
    counts: dict[str, int] = {}
    for node in nodes:
        counts[node.health] = counts.get(node.health, 0) + 1
    parts = ", ".join(f"{n} {h}" for h, n in sorted(counts.items()))
    schedulable = sum(1 for n in nodes if n.schedulable)
    return f"{len(nodes)} nodes ({parts or 'none'}); {schedulable} schedulable"
