"""Public test helpers: a fake clock and a scripted probe, used by our tests and by users'."""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Iterable

from nodewatch.detect.types import CheckResult, FailureClass


class FakeClock:
    """A clock that only moves when told to; pass ``clock`` wherever a time source is taken."""

    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        if seconds < 0:
            raise ValueError("time does not go backwards")
        self.now += seconds
        return self.now


class FakeProbe:
    """A probe that answers from a script per node: True (ok) or a FailureClass."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.script: dict[str, deque[bool | FailureClass]] = defaultdict(deque)
        self.default: dict[str, bool | FailureClass] = {}
        self.calls: list[str] = []

    def set(self, node_id: str, outcome: bool | FailureClass) -> None:
        self.default[node_id] = outcome

    def queue(self, node_id: str, outcomes: Iterable[bool | FailureClass]) -> None:
        self.script[node_id].extend(outcomes)

    async def check(self, node_id: str, address: str) -> CheckResult:
        self.calls.append(node_id)
        queued = self.script[node_id]
        outcome = queued.popleft() if queued else self.default.get(node_id, True)
        if outcome is True:
            return CheckResult(node_id=node_id, ok=True, at=self.clock())
        failure = outcome if isinstance(outcome, FailureClass) else FailureClass.ERROR
        return CheckResult(node_id=node_id, ok=False, at=self.clock(), failure=failure,
                           detail=f"scripted {failure.value}")
