"""What the benchmark scripts share: a run made once and reused by later calls, with the wall time it took."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable


def timed_run(run: Path, make: Callable[[], object]) -> tuple[Path, float]:
    """``run`` and the seconds that making it took: reused when an earlier call finished it (its checkpoints and
    ``wall_time.json`` are there), else made now by ``make()`` and its time recorded in ``run/wall_time.json``."""
    timing = run / "wall_time.json"
    if (run / "checkpoints").is_dir() and timing.is_file():
        return run, json.loads(timing.read_text())["seconds"]
    start = time.perf_counter()
    make()
    seconds = time.perf_counter() - start
    timing.write_text(json.dumps({"seconds": seconds}))
    return run, seconds
