"""Time :func:`aldk_tf.spatial.warp` against reference formulations, in one run (and
the cross-resolution flow upsampling with and without XLA).

    python bench/warp.py [--size 128] [--repeats 5] [--channels 1] [--batch 1] [--eager]

For each implementation prints the median wall time (ms) of the forward pass and of
forward + backward (gradient of ``sum(warp(image, flow))`` with respect to image and
flow, through ``tf.GradientTape``), plus the median process CPU time of the same runs
(all threads; on a shared machine it is steadier than wall time). Each function is
wrapped in ``tf.function`` (graph mode, as in training) unless ``--eager``; one warm-up
call (tracing, XLA compilation) precedes the timed calls.

The image is uniform noise; the flow is smooth (a random 6^3 control grid, up to ~10
voxels, interpolated trilinearly, plus 0.3-voxel noise), like a registration field.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from aldk_tf import spatial  # noqa: E402

try:                                 # python -m bench.<script>; imported from the root (tests)
    from bench.timing import repeat_timed
except ModuleNotFoundError:          # python bench/<script>.py: sys.path[0] is bench/
    from timing import repeat_timed


# --- Reference implementations, kept here for comparison only (not used by the library).

def reference_eight_gathers(image: tf.Tensor, flow: tf.Tensor) -> tf.Tensor:
    """REFERENCE: one ``gather_nd`` per cell corner with clamped indices, weights summed."""
    shape = tf.shape(image)
    size = tf.cast(shape[1:4], tf.float32)
    grid = spatial.voxel_grid((shape[1], shape[2], shape[3]))
    position = tf.clip_by_value(grid[None] + flow, 0.0, size - 1.0)   # [B, D, H, W, 3]
    lower = tf.floor(position)
    fraction = position - lower
    lower = tf.cast(lower, tf.int32)
    upper = tf.minimum(lower + 1, shape[1:4] - 1)
    warped = 0.0
    for corner in range(8):
        pick = [(corner >> (2 - axis)) & 1 for axis in range(3)]
        index = tf.stack([upper[..., a] if p else lower[..., a] for a, p in enumerate(pick)],
                         axis=-1)
        weight = 1.0
        for a, p in enumerate(pick):
            weight = weight * (fraction[..., a] if p else 1.0 - fraction[..., a])
        values = tf.gather_nd(image, index, batch_dims=1)
        warped = warped + values * weight[..., None]
    return warped


def reference_stacked_neighbours(image: tf.Tensor, flow: tf.Tensor) -> tf.Tensor:
    """REFERENCE: the previous library warp: 8 edge-padded shifts stacked, one gather."""
    shape = tf.shape(image)
    batch, depth, height, width, channels = (shape[0], shape[1], shape[2], shape[3],
                                             shape[4])
    size = tf.cast(tf.stack([depth, height, width]), tf.float32)
    grid = spatial.voxel_grid((depth, height, width))
    position = tf.clip_by_value(grid[None] + flow, 0.0, size - 1.0)
    base = tf.floor(position)
    fraction = position - base
    base = tf.cast(base, tf.int32)
    padded = tf.pad(image, [[0, 0], [0, 1], [0, 1], [0, 1], [0, 0]], mode="SYMMETRIC")
    corners = tf.concat(
        [padded[:, dz:dz + depth, dy:dy + height, dx:dx + width, :]
         for dz in (0, 1) for dy in (0, 1) for dx in (0, 1)],
        axis=-1)                                                # [B, D, H, W, 8C]
    corners = tf.reshape(corners, [-1, 8, channels])
    index = ((base[..., 0] * height + base[..., 1]) * width + base[..., 2])
    index = index + tf.range(batch)[:, None, None, None] * (depth * height * width)
    sampled = tf.gather(corners, tf.reshape(index, [-1]))       # [N, 8, C]
    fz, fy, fx = tf.unstack(tf.reshape(fraction, [-1, 3]), axis=-1)
    wz = tf.stack([1.0 - fz, fz], axis=-1)[:, :, None, None]
    wy = tf.stack([1.0 - fy, fy], axis=-1)[:, None, :, None]
    wx = tf.stack([1.0 - fx, fx], axis=-1)[:, None, None, :]
    weights = tf.reshape(wz * wy * wx, [-1, 8, 1])
    return tf.reshape(tf.reduce_sum(sampled * weights, axis=1), shape)


IMPLEMENTATIONS = {
    "aldk_tf.spatial.warp": spatial.warp,
    "reference: stacked neighbours (previous)": reference_stacked_neighbours,
    "reference: eight gathers": reference_eight_gathers,
}


def smooth_flow(rng, batch: int, size: int) -> np.ndarray:
    """Random 6^3 control grid (sd 4 voxels) interpolated trilinearly, plus fine noise."""
    control = tf.constant(rng.standard_normal((batch, 6, 6, 6, 3)) * 4.0, tf.float32)
    coordinate = spatial.voxel_grid((size,) * 3) * (5.0 / (size - 1))
    flow = spatial.sample(control, tf.stack([coordinate] * batch)).numpy()
    return (flow + rng.standard_normal(flow.shape) * 0.3).astype(np.float32)


def forward_backward(warp):
    def run(image, flow):
        with tf.GradientTape() as tape:
            tape.watch([image, flow])
            loss = tf.reduce_sum(warp(image, flow))
        return tape.gradient(loss, [image, flow])
    return run


def time_call(function, args, repeats: int) -> tuple[float, float]:
    """Median wall and CPU milliseconds over ``repeats`` calls after one warm-up call."""
    def call():
        for result in tf.nest.flatten(function(*args)):
            result.numpy()
    call()
    wall, cpu = repeat_timed(call, repeats)
    return 1e3 * float(np.median(wall)), 1e3 * float(np.median(cpu))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--eager", action="store_true", help="no tf.function wrapper")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    shape = (args.batch,) + (args.size,) * 3
    image = tf.constant(rng.random(shape + (args.channels,), dtype=np.float32))
    flow = tf.constant(smooth_flow(rng, args.batch, args.size))
    print(f"warp of {list(image.shape)} by a smooth flow, {args.repeats} repeats, "
          f"{'eager' if args.eager else 'tf.function'}, "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")

    wrap = (lambda f: f) if args.eager else tf.function
    expected = None
    rows = []
    for name, warp in IMPLEMENTATIONS.items():
        warped = warp(image, flow).numpy()
        if expected is None:
            expected, difference = warped, 0.0
        else:
            difference = float(np.abs(warped - expected).max())
        forward = time_call(wrap(warp), (image, flow), args.repeats)
        both = time_call(wrap(forward_backward(warp)), (image, flow), args.repeats)
        rows.append((name, forward, both, difference))

    print(f"{'implementation':44s} {'forward ms':>16s} {'fwd+bwd ms':>16s}  max |diff|")
    print(f"{'':44s} {'wall':>8s}{'cpu':>8s} {'wall':>8s}{'cpu':>8s}")
    for name, forward, both, difference in rows:
        print(f"{name:44s} {forward[0]:8.1f}{forward[1]:8.1f} {both[0]:8.1f}{both[1]:8.1f}"
              f"  {difference:.1e}")
    current = rows[0]
    for name, forward, both, _ in rows[1:]:
        print(f"speed-up vs {name}: forward {forward[0] / current[1][0]:.1f}x wall, "
              f"{forward[1] / current[1][1]:.1f}x cpu; forward+backward "
              f"{both[0] / current[2][0]:.1f}x wall, {both[1] / current[2][1]:.1f}x cpu")

    # The cross-resolution student's flow upsampling (factor 2 onto this grid).
    if args.size % 2 == 0:
        low = tf.constant(smooth_flow(rng, args.batch, args.size // 2) / 2.0)
        upsampled = {
            "spatial.upsample_flow (XLA, library)": lambda f: spatial.upsample_flow(f, 2),
            "reference: same ops without XLA": lambda f: 2.0 * spatial.resolution._upsample(f, 2)}
        print(f"\nflow upsampling {list(low.shape)} -> {args.size}^3 (factor 2)")
        # A random upstream gradient (an input, so that nothing is constant-folded).
        upstream = tf.constant(rng.random(image.shape[:4] + (3,), dtype=np.float32))
        timings = []
        for name, function in upsampled.items():
            forward = time_call(wrap(function), (low,), args.repeats)

            def backward(f, weights, function=function):
                with tf.GradientTape() as tape:
                    tape.watch(f)
                    total = tf.reduce_sum(function(f) * weights)
                return tape.gradient(total, f)
            both = time_call(wrap(backward), (low, upstream), args.repeats)
            timings.append((forward, both))
            print(f"{name:44s} {forward[0]:8.1f}{forward[1]:8.1f} {both[0]:8.1f}"
                  f"{both[1]:8.1f}")
        (forward, both), (reference, reference_both) = timings
        print(f"speed-up vs the same ops without XLA: forward "
              f"{reference[0] / forward[0]:.1f}x wall, {reference[1] / forward[1]:.1f}x "
              f"cpu; forward+backward {reference_both[0] / both[0]:.1f}x wall")


if __name__ == "__main__":
    main()
