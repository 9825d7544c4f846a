"""Figures of one fault scenario run, appended as one JSON line (``scripts/fault_table.py``
turns the file into the README's table)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["REPEAT", "Figures", "Recorder", "repeats"]

#: How many times each cheap scenario runs (``NODEWATCH_FAULT_REPEAT``, default 2).
REPEAT = max(1, int(os.environ.get("NODEWATCH_FAULT_REPEAT", "2")))


def repeats(count: int = REPEAT) -> list[int]:
    """Parametrize values for ``run``: 1..count."""
    return list(range(1, count + 1))


@dataclass
class Figures:
    scenario: str
    run: int = 1
    passed: bool = False
    false_confirmations: int = 0
    detections: list[float] = field(default_factory=list)  # seconds, one per real fault found
    missed: int = 0  # a real fault not confirmed within its bound
    late: int = 0  # confirmed, but later than the scenario's bound
    actions_twice: int = 0
    commands_lost: int = 0  # acknowledged (2xx) and gone after the fault
    events_lost: int = 0
    wrong_answers: int = 0  # a command answered neither 2xx nor 503 naming the store (in bound)
    reviews: int = 0  # review events where none was due
    notes: str = ""
    seconds: float = 0.0
    test: str = ""


class Recorder:
    def __init__(self, path: Path, test: str) -> None:
        self.path = path
        self.test = test
        self._start = time.monotonic()

    def new(self, scenario: str, run: int = 1) -> Figures:
        return Figures(scenario=scenario, run=run, test=self.test)

    def write(self, figures: Figures) -> None:
        figures.seconds = round(time.monotonic() - self._start, 1)
        with self.path.open("a") as f:
            f.write(json.dumps(asdict(figures)) + "\n")
