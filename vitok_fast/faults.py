"""A test hook: kill this process at a named point of a run, once.

The fault tests (tests/test_preemption.py) use it to prove that a run survives a lost rank
and a crash halfway through a checkpoint save; a real run never sets it.

    VITOK_FAULT_KILL=<point>:<step>[:<rank>]      rank defaults to 0

``point`` is ``step`` (train/stage*.py, right after the optimizer update of step ``step``,
before that step's logging and saving) or ``save`` (inside ``save_checkpoint`` of step
``step``, after the weights are written and before the train state is). The first time the
point is reached the process writes the marker ``<run>/.fault-<point>-<step>-rank<rank>``
and sends itself SIGKILL; with the marker present the point is passed, so the job that
``torchrun --max-restarts`` starts again does not die a second time.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

ENV = "VITOK_FAULT_KILL"


def kill_point(point: str, step: int, run_dir) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    name, at, *rank = spec.split(":")
    me = int(os.environ.get("RANK", 0))
    if name != point or int(at) != step or me != (int(rank[0]) if rank else 0):
        return
    marker = Path(run_dir) / f".fault-{point}-{step}-rank{me}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    os.kill(os.getpid(), signal.SIGKILL)
