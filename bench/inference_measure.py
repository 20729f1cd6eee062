"""Measuring one row of ``bench/inference.py``: wall and CPU time, memory, work against
the machine's peak, and ratios of two rows timed in alternation."""

from __future__ import annotations

import gc
import os
import re

import keras
import numpy as np
import tensorflow as tf

try:                                 # python -m bench.<script>; imported from the root (tests)
    from bench.inference_rows import Row, fetching, prepare
    from bench.timing import repeat_timed
except ModuleNotFoundError:          # python bench/<script>.py: sys.path[0] is bench/
    from inference_rows import Row, fetching, prepare
    from timing import repeat_timed


# ----------------------------------------------------------------------------- memory
def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            match = re.search(rf"^{field}:\s+(\d+) kB", handle.read(), re.MULTILINE)
        return int(match.group(1)) if match else None
    except OSError:
        return None


def reset_peak_memory() -> bool:
    """Reset the process's ``VmHWM`` to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def measure(call, warmup: int, repeats: int) -> dict:
    rss = _status_kb("VmRSS")
    has_peak = reset_peak_memory()
    for _ in range(warmup):
        call()
    wall, cpu = repeat_timed(call, repeats)
    peak = _status_kb("VmHWM") if has_peak else None
    result = {"median_ms": 1e3 * float(np.median(wall)), "min_ms": 1e3 * min(wall),
              "max_ms": 1e3 * max(wall), "cpu_ms": 1e3 * float(np.median(cpu)),
              "repeats": repeats, "load_1min": round(os.getloadavg()[0], 2)}
    if rss is not None:
        result["rss_mb"] = rss / 1024
    if peak is not None and rss is not None:
        result.update(peak_mb=peak / 1024, peak_increase_mb=(peak - rss) / 1024)
    return result


def add_speed(result: dict, work: dict, peaks: dict) -> dict:
    """Work and distance to the machine's limit of one measured row (in place).

    Network rows: ``work_gflop`` (convolutions and dense layers, bench/work.py),
    ``gflops`` (work / median time), ``peak_fraction`` (``gflops`` over the measured
    peak of the row's dtype), ``memory_mb`` (what its warps, flow compositions and affine
    flows must move at least) and ``limit_ms``: the work at that peak plus those bytes at
    the measured "scale" bandwidth; ``x_limit`` = median / ``limit_ms``. The warp row:
    ``bytes`` it must move, ``bound_ms`` (bytes over the bandwidth; its ``limit_ms``),
    ``peak_fraction`` (``bound_ms`` / median), and where the machine's gather floor was
    measured at its size (:func:`bench.machine.gather_floor`), ``floor_ms`` and
    ``x_floor`` = median / ``floor_ms``.
    """
    seconds = result["median_ms"] / 1e3
    bandwidth = peaks.get("memory", {}).get("scale_gbs")
    if "bytes" in work:
        result["bytes"] = int(work["bytes"])
        if bandwidth:
            result["bound_ms"] = result["limit_ms"] = 1e3 * work["bytes"] / (bandwidth * 1e9)
            result["peak_fraction"] = result["bound_ms"] / result["median_ms"]
            result["x_limit"] = result["median_ms"] / result["limit_ms"]
        gather = peaks.get("gather", {})
        if gather.get("floor_ms") and gather.get("size") == work.get("size"):
            result["floor_ms"] = gather["floor_ms"]
            result["x_floor"] = result["median_ms"] / gather["floor_ms"]
        return result
    if "total" not in work:                                   # ANTs: not counted
        return result
    result["work_gflop"] = work["total"] / 1e9
    result["work_by_kind_gflop"] = {kind: flops / 1e9 for kind, flops in work.items()
                                    if kind not in ("total", "memory_bytes") and flops}
    result["gflops"] = result["work_gflop"] / seconds
    peak = peaks.get(result.get("dtype", "float32"), {}).get("gflops")
    if peak:
        result["peak_fraction"] = result["gflops"] / peak
        result["memory_mb"] = work.get("memory_bytes", 0) / 1e6
        if bandwidth:
            result["limit_ms"] = 1e3 * (result["work_gflop"] / peak
                                        + work.get("memory_bytes", 0) / (bandwidth * 1e9))
            result["x_limit"] = result["median_ms"] / result["limit_ms"]
    return result


def run_row(row: Row, size: int, fixed, moving, warmup: int, repeats: int,
            workdir: str, peaks: dict | None = None, ants_repeats: int = 1,
            keep: bool = False) -> tuple[dict, object]:
    """The row's measurement, and (``keep``) its timed call kept ready for
    :func:`paired_ratios` (else None: the model is released)."""
    prepared = prepare(row, size, workdir)
    if row.batch > 1:                    # the same pair, row.batch times
        fixed, moving = (np.repeat(image, row.batch, axis=0) for image in (fixed, moving))
    if row.source not in ("tflite", "ants"):
        fixed, moving = tf.constant(fixed), tf.constant(moving)
    if row.source == "ants":             # nothing to trace or compile; minutes per call
        warmup, repeats = 0, ants_repeats
    call = fetching(prepared.run, fixed, moving)
    result = measure(call, warmup, repeats)
    result.update(params=int(prepared.params), source=row.source, dtype=row.dtype,
                  batch=row.batch, pairs_per_s=row.batch / (result["median_ms"] / 1e3))
    if row.refine:
        result["refine_steps"] = row.refine
    add_speed(result, prepared.work, peaks or {})
    if prepared.slow is not None:
        result["slow_ops"] = prepared.slow
    if keep:
        call.prepared = prepared                    # the model stays alive with the call
        return result, call
    del prepared, call
    keras.backend.clear_session()
    gc.collect()
    return result, None


def paired_ratios(pairs, calls: dict, rounds: int) -> dict[str, dict]:
    """Each ratio again from calls of its two rows in alternation (a b, b a, ...):
    ``{label: {"paired": median over rounds of t_a / t_b (wall), "paired_cpu": the same
    for process CPU time, "rounds": rounds}}``.

    The rows' own medians come from minutes apart; on a shared machine whose speed
    drifts, the ratio of two calls made back to back is the steadier comparison.
    """
    paired = {}
    for a, b in pairs:
        if a not in calls or b not in calls:
            continue
        for name in (a, b):                         # caches warm again after other rows
            calls[name]()
        walls, cpus = [], []
        for index in range(rounds):
            times = {}
            for name in ((a, b) if index % 2 == 0 else (b, a)):
                wall, cpu = repeat_timed(calls[name], 1)
                times[name] = (wall[0], cpu[0])
            walls.append(times[a][0] / times[b][0])
            cpus.append(times[a][1] / times[b][1])
        paired[f"{a} / {b}"] = {"paired": float(np.median(walls)),
                                "paired_cpu": float(np.median(cpus)), "rounds": rounds}
    return paired
