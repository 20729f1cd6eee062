"""The timing loop the benchmark scripts share."""

from __future__ import annotations

import time


def repeat_timed(call, repeats: int) -> tuple[list[float], list[float]]:
    """Call ``call()`` ``repeats`` times; its wall and process-CPU seconds per call
    (``time.perf_counter`` / ``time.process_time``: CPU time counts all threads)."""
    wall, cpu = [], []
    for _ in range(repeats):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        call()
        wall.append(time.perf_counter() - start_wall)
        cpu.append(time.process_time() - start_cpu)
    return wall, cpu
