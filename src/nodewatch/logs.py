"""Process logging: plain text for people, one JSON object a line for machines; secrets masked.

The JSON format (``--log-format json``) writes ``ts`` (RFC 3339, UTC, milliseconds), ``level``,
``logger``, ``msg``, and ``node_id`` / ``event`` where a record carries them (``extra=``; the
agent stamps its own node id on every record), ``exc`` with a whole traceback in one record.
Hand-written on the standard ``logging``: the fields and the masking are ours either way, and
an agent on every node is better without one more dependency.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any, Literal, TextIO

from nodewatch.errors import ConfigError

__all__ = ["FORMATS", "JsonFormatter", "LogFormat", "Masker", "TEXT_FORMAT", "TextFormatter",
           "configure_logging", "resolve_format"]

LogFormat = Literal["text", "json"]
FORMATS = ("text", "json", "auto")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_ENV = "NODEWATCH_LOG_FORMAT"

# Fields copied from a record's ``extra=`` into the JSON object, when present.
_CONTEXT = ("node_id", "event")
_BEARER_RE = re.compile(r"(?i)\b(bearer\s+)[^\s\"',;]+")
_URL_PASSWORD_RE = re.compile(r"(://[^/\s:@]*:)[^@\s/]+@")


def resolve_format(flag: str | None, configured: str = "text",
                   environ: Mapping[str, str] | None = None,
                   stream: TextIO | None = None) -> LogFormat:
    """The format in force: the flag, else ``NODEWATCH_LOG_FORMAT``, else the config key, else
    text. ``auto`` is text on a terminal and JSON otherwise (journald, a pipe, a file)."""
    env = os.environ if environ is None else environ
    choice = flag or env.get(_ENV) or configured or "text"
    if choice not in FORMATS:
        source = "--log-format" if flag else _ENV if env.get(_ENV) else "log_format"
        raise ConfigError(f"{source}: expected one of {', '.join(FORMATS)}, got {choice!r}")
    if choice == "auto":
        out = stream or sys.stderr
        return "text" if out.isatty() else "json"
    return "json" if choice == "json" else "text"


class Masker:
    """Replaces configured secrets, bearer tokens and URL passwords with ``***``."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        # Longest first, so a token that contains another is masked whole; very short strings
        # would mask ordinary words and are rejected as tokens long before this anyway.
        self.secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, "***")
        text = _BEARER_RE.sub(r"\1***", text)
        return _URL_PASSWORD_RE.sub(r"\1***@", text)


class TextFormatter(logging.Formatter):
    """The plain format people read (and the tests grep), masked."""

    def __init__(self, masker: Masker) -> None:
        super().__init__(TEXT_FORMAT)
        self.mask = masker

    def format(self, record: logging.LogRecord) -> str:
        return self.mask(super().format(record))


def _rfc3339(ts: float) -> str:
    whole = int(ts)
    millis = int((ts - whole) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{millis:03d}Z"


class JsonFormatter(logging.Formatter):
    """One JSON object a line; a traceback is the ``exc`` field of its record, not more lines."""

    def __init__(self, masker: Masker) -> None:
        super().__init__()
        self.mask = masker

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": _rfc3339(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": self.mask(record.getMessage()),
        }
        for key in _CONTEXT:
            value = record.__dict__.get(key)
            if value is not None and value != "":
                doc[key] = self.mask(str(value))
        if record.exc_info:
            doc["exc"] = self.mask(self.formatException(record.exc_info))
        elif record.exc_text:
            doc["exc"] = self.mask(record.exc_text)
        if record.stack_info:
            doc["stack"] = self.mask(self.formatStack(record.stack_info))
        return json.dumps(doc, ensure_ascii=False, default=str)


class _NodeId(logging.Filter):
    """Stamps the agent's node id on records that do not name a node themselves."""

    def __init__(self, node_id: str) -> None:
        super().__init__()
        self.node_id = node_id

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.__dict__.get("node_id"):
            record.node_id = self.node_id
        return True


_HANDLER_MARK = "_nodewatch_handler"


def configure_logging(level: str, log_format: LogFormat, *, secrets: Iterable[str] = (),
                      node_id: str = "", stream: TextIO | None = None) -> logging.Handler:
    """Install the process's one log handler on the root logger (replacing an earlier one of
    ours). In JSON, uncaught exceptions and warnings become records too, so that nothing a
    machine reads spans lines."""
    masker = Masker(secrets)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(masker) if log_format == "json" else TextFormatter(masker))
    if node_id:
        handler.addFilter(_NodeId(node_id))
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    if log_format == "json":
        logging.captureWarnings(True)
        sys.excepthook = _log_uncaught
        threading.excepthook = _log_uncaught_in_thread
    return handler


def _log_uncaught(kind: type[BaseException], exc: BaseException,
                  tb: TracebackType | None) -> None:
    logging.getLogger("nodewatch").critical("uncaught %s", kind.__name__, exc_info=(kind, exc, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is None:
        return
    logging.getLogger("nodewatch").critical(
        "uncaught %s in thread %s", args.exc_type.__name__,
        args.thread.name if args.thread else "?",
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback))
