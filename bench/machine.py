"""What this CPU can do, measured in the benchmark's own process: bfloat16 support,
peak arithmetic (fp32 / bf16) and memory bandwidth.

- :func:`bf16_features` / :func:`bf16_decision`: which bfloat16 instructions
  ``/proc/cpuinfo`` lists (``amx_bf16``: Intel AMX tiles, Sapphire Rapids and later;
  ``avx512_bf16``: AVX-512 BF16 dot products, e.g. AMD Zen 4, Intel Cooper Lake), and
  whether the benchmark's ``_bf16`` rows run: ``auto`` (only with one of them), ``on``
  (forced: without them oneDNN emulates bfloat16 and the rows show that cost) or ``off``.
  The environment variable ``ALDK_BF16`` sets the default of ``--bf16``.
- :func:`peak_gflops`: a large ``tf.matmul`` and a 1x1x1 ``Conv3D`` of realistic channel
  count, median GFLOP/s of several calls with TensorFlow's default threads (every core):
  what oneDNN reaches on dense work, the ceiling a convolutional network can approach.
- :func:`memory_bandwidth`: STREAM-style "scale" (``b = s * a``: bytes read + written)
  and "sum" (bytes read) over arrays far larger than the caches, one thread per core,
  preallocated outputs (no page faults in the timed calls).
- :func:`gather_floor`: the fastest gather this stack issues -- eight gathers per voxel
  of a ``size``³ image at the cell corners a smooth flow visits (the warp's own access
  pattern), summed, as plain ``tf.gather`` and under XLA; the faster is the floor a
  trilinear warp built from gathers cannot beat (ns per gathered value, every core).
"""

from __future__ import annotations

import concurrent.futures
import os

import numpy as np
import tensorflow as tf

# The CPU-feature check is the library's (export.py --dtype bfloat16 uses it too).
from aldk_tf.deploy.cpu import BF16_FLAGS, bf16_features, cpu_flags  # noqa: F401

try:                                 # python -m bench.<script>; imported from the root (tests)
    from bench.timing import repeat_timed
except ModuleNotFoundError:          # python bench/<script>.py: sys.path[0] is bench/
    from timing import repeat_timed

BF16_MODES = ("auto", "on", "off")
BF16_ENV = "ALDK_BF16"
#: Sizes of the micro-benchmarks: "full" for a measurement, "quick" to check that the
#: code runs (tests; its numbers are not a peak).
PEAK_SIZES = {
    "full": {"matmul": 2048, "conv_grid": 64, "conv_channels": 128, "megabytes": 256},
    "quick": {"matmul": 256, "conv_grid": 16, "conv_channels": 32, "megabytes": 8},
}


def bf16_decision(mode: str = "auto", cpuinfo: str | None = None) -> tuple[bool, str]:
    """``(run the bfloat16 rows, why)`` for ``--bf16 auto|on|off``."""
    if mode not in BF16_MODES:
        raise ValueError(f"--bf16: expected one of {', '.join(BF16_MODES)}, got {mode!r}")
    features = bf16_features(cpuinfo)
    have = ", ".join(features) if features else "neither amx_bf16 nor avx512_bf16"
    if mode == "off":
        return False, f"--bf16 off (CPU: {have})"
    if mode == "on":
        return True, f"--bf16 on (CPU: {have})"
    if features:
        return True, f"CPU has {have}"
    return False, f"CPU has {have} in /proc/cpuinfo (--bf16 on forces the rows)"


def default_bf16_mode() -> str:
    """``$ALDK_BF16`` if set (auto/on/off), else ``auto``."""
    return os.environ.get(BF16_ENV, "auto").strip().lower() or "auto"


# ----------------------------------------------------------------------------- arithmetic
def _median_seconds(call, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        call()
    wall, _ = repeat_timed(call, repeats)
    return float(np.median(wall))


def peak_gflops(dtype: str = "float32", size: str = "full", repeats: int = 5) -> dict:
    """Median GFLOP/s of ``matmul`` (n x n times n x n) and ``conv1x1x1`` (``[1, g, g, g,
    c]`` to ``c`` channels) in ``dtype`` ("float32" or "bfloat16"), with their sizes."""
    sizes = PEAK_SIZES[size]
    tf_dtype = tf.as_dtype(dtype)
    rng = np.random.default_rng(0)

    n = sizes["matmul"]
    a = tf.cast(tf.constant(rng.standard_normal((n, n), dtype=np.float32)), tf_dtype)
    b = tf.cast(tf.constant(rng.standard_normal((n, n), dtype=np.float32)), tf_dtype)
    spec = tf.TensorSpec([n, n], tf_dtype)
    matmul = tf.function(tf.matmul, input_signature=[spec, spec])
    matmul_s = _median_seconds(lambda: matmul(a, b), 1, repeats)

    g, c = sizes["conv_grid"], sizes["conv_channels"]
    volume = tf.cast(tf.constant(rng.standard_normal((1, g, g, g, c), dtype=np.float32)),
                     tf_dtype)
    kernel = tf.cast(tf.constant(rng.standard_normal((1, 1, 1, c, c), dtype=np.float32)),
                     tf_dtype)

    @tf.function(input_signature=[tf.TensorSpec(volume.shape, tf_dtype),
                                  tf.TensorSpec(kernel.shape, tf_dtype)])
    def conv(x, k):
        return tf.nn.conv3d(x, k, [1, 1, 1, 1, 1], "SAME")

    conv_s = _median_seconds(lambda: conv(volume, kernel), 1, repeats)
    return {"dtype": dtype,
            "matmul": {"n": n, "gflops": 2 * n ** 3 / matmul_s / 1e9},
            "conv1x1x1": {"grid": g, "channels": c,
                          "gflops": 2 * g ** 3 * c * c / conv_s / 1e9},
            "gflops": max(2 * n ** 3 / matmul_s, 2 * g ** 3 * c * c / conv_s) / 1e9}


# ----------------------------------------------------------------------------- memory
def memory_bandwidth(size: str = "full", repeats: int = 5, threads: int | None = None) -> dict:
    """Median GB/s (1e9 bytes) of "scale" (``b = 2 a``, bytes read + written) and "sum"
    (bytes read) over float32 arrays of ``PEAK_SIZES[size]["megabytes"]`` each, split
    into one contiguous part per thread."""
    threads = threads or os.cpu_count() or 1
    count = PEAK_SIZES[size]["megabytes"] * 2 ** 20 // 4
    source = np.ones(count, dtype=np.float32)
    target = np.empty_like(source)
    target.fill(0.0)                                     # touch every page before timing
    parts = np.array_split(np.arange(count), threads)
    bounds = [(int(p[0]), int(p[-1]) + 1) for p in parts if len(p)]
    with concurrent.futures.ThreadPoolExecutor(len(bounds)) as pool:
        def scale():                                     # numpy releases the GIL
            list(pool.map(lambda r: np.multiply(source[r[0]:r[1]], 2.0,
                                                out=target[r[0]:r[1]]), bounds))

        def total():
            list(pool.map(lambda r: np.add.reduce(source[r[0]:r[1]]), bounds))

        scale_s = _median_seconds(scale, 1, repeats)
        sum_s = _median_seconds(total, 1, repeats)
    return {"megabytes": count * 4 / 2 ** 20, "threads": len(bounds),
            "scale_gbs": 2 * count * 4 / scale_s / 1e9, "sum_gbs": count * 4 / sum_s / 1e9}


def warp_bytes(size: int, batch: int = 1) -> int:
    """Bytes one trilinear warp of a ``[batch, S, S, S, 1]`` float32 image must move at
    least: read the image (4 B / voxel) and the flow (12), write the result (4)."""
    return batch * size ** 3 * (4 + 12 + 4)


# ----------------------------------------------------------------------------- gathers
def gather_floor(size: int, repeats: int = 5, flow_amplitude: float = 4.0) -> dict:
    """Median time of eight gathers per voxel of a ``[size³]`` float32 image (the cell
    corners of ``x + flow(x)`` for a smooth random flow of up to ``flow_amplitude``
    voxels), summed into one value per voxel: ``{"plain_ms", "xla_ms", "floor_ms",
    "ns_per_value"}`` (floor: the faster; ns per gathered value, all threads)."""
    rng = np.random.default_rng(0)
    voxels = size ** 3
    image = tf.constant(rng.random(voxels, dtype=np.float32))
    controls = rng.uniform(-flow_amplitude, flow_amplitude, (3, 4, 4, 4))
    from scipy import ndimage
    grid = np.indices((size,) * 3, dtype=np.float64)
    flow = np.stack([ndimage.zoom(c, size / 4, order=1) for c in controls])
    position = np.clip(grid + flow, 0, size - 2)
    lower = np.floor(position).astype(np.int64)
    corner = (lower[0] * size + lower[1]) * size + lower[2]
    offsets = [dz * size * size + dy * size + dx
               for dz in (0, 1) for dy in (0, 1) for dx in (0, 1)]
    indices = tf.constant(np.stack([corner.ravel() + o for o in offsets]).astype(np.int32))

    def eight(values, index):
        return tf.add_n([tf.gather(values, index[k]) for k in range(8)])

    spec = [tf.TensorSpec(image.shape, tf.float32), tf.TensorSpec(indices.shape, tf.int32)]
    plain = tf.function(eight, input_signature=spec)
    compiled = tf.function(eight, input_signature=spec, jit_compile=True)
    plain_s = _median_seconds(lambda: plain(image, indices).numpy(), 1, repeats)
    xla_s = _median_seconds(lambda: compiled(image, indices).numpy(), 1, repeats)
    floor_s = min(plain_s, xla_s)
    return {"size": size, "values": 8 * voxels, "plain_ms": 1e3 * plain_s,
            "xla_ms": 1e3 * xla_s, "floor_ms": 1e3 * floor_s,
            "ns_per_value": 1e9 * floor_s / (8 * voxels)}
