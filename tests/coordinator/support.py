"""What the coordinator tests share: a recording action sink and a bounded wait."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from nodewatch.detect.outcome import ActionRequest
from nodewatch.model import Event


class RecordingActions:
    """An ActionSink that records what it was handed (an action 'runs' when submitted)."""

    def __init__(self) -> None:
        self.submitted: list[str] = []

    def submit(self, request: ActionRequest, event: Event | None) -> None:
        self.submitted.append(f"{request.kind}:{request.node_id}")

    async def aclose(self) -> None:
        return None


async def eventually(condition: Callable[[], object], within: float, message: str) -> None:
    """Wait for ``condition`` on the loop, failing with ``message`` after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {message}")
        await asyncio.sleep(0.02)
