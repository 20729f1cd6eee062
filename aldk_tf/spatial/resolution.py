"""Integer-factor down- and upsampling of volumes and flows (cell-centred grids)."""

from __future__ import annotations

import tensorflow as tf

from .checks import check_volume


def _check_factor(volume: tf.Tensor, factor: int, downsampling: bool) -> None:
    if int(factor) < 1:
        raise ValueError(f"factor: expected a positive integer, got {factor}")
    if downsampling and any(n is not None and n % factor for n in volume.shape[1:4]):
        raise ValueError(f"volume: spatial shape {volume.shape[1:4].as_list()} is not "
                         f"divisible by the factor {factor}")


def downsample(volume: tf.Tensor, factor: int) -> tf.Tensor:
    """Average over ``factor``^3 blocks: ``[B, D, H, W, C] -> [B, D/f, H/f, W/f, C]``.

    Low-resolution voxel ``u`` covers full-resolution voxels ``f u .. f u + f - 1`` (its
    centre is at ``f u + (f - 1) / 2``), the convention :func:`upsample` inverts.
    """
    volume = tf.convert_to_tensor(volume)
    check_volume("volume", volume)
    _check_factor(volume, factor, downsampling=True)
    if factor == 1:
        return volume
    for axis in (1, 2, 3):
        shape = tf.shape(volume)
        outer = tf.reduce_prod(shape[:axis]) * (shape[axis] // factor)
        inner = tf.reduce_prod(shape[axis + 1:])
        blocks = tf.reshape(volume, tf.stack([outer, factor, inner]))
        new_shape = tf.tensor_scatter_nd_update(shape, [[axis]], [shape[axis] // factor])
        static = volume.shape.as_list()
        static[axis] = None if static[axis] is None else static[axis] // factor
        volume = tf.reshape(tf.reduce_mean(blocks, axis=1), new_shape)
        volume.set_shape(static)
    return volume


def upsample(volume: tf.Tensor, factor: int) -> tf.Tensor:
    """Trilinear upsampling by an integer factor on cell-centred grids, edges clamped.

    Full-resolution voxel ``x`` samples the low-resolution volume at
    ``u = (x + 0.5) / f - 0.5`` (the inverse of :func:`downsample`'s block layout), done
    as three separable 1-D passes of shifted slices (no gathers), XLA-compiled.
    """
    volume = tf.convert_to_tensor(volume)
    check_volume("volume", volume)
    _check_factor(volume, factor, downsampling=False)
    if factor == 1:
        return volume
    return _upsample_xla(volume, int(factor))


def _upsample(volume: tf.Tensor, factor: int) -> tf.Tensor:
    for axis in (1, 2, 3):
        shape = tf.shape(volume)
        n = shape[axis]
        outer, inner = tf.reduce_prod(shape[:axis]), tf.reduce_prod(shape[axis + 1:])
        line = tf.reshape(volume, tf.stack([outer, n, inner]))          # [O, n, I]
        previous = tf.concat([line[:, :1], line[:, :-1]], axis=1)
        following = tf.concat([line[:, 1:], line[:, -1:]], axis=1)
        phases = []
        for k in range(factor):
            offset = (k + 0.5) / factor - 0.5                 # in (-0.5, 0.5)
            neighbour = following if offset >= 0 else previous
            phases.append((1.0 - abs(offset)) * line + abs(offset) * neighbour)
        line = tf.stack(phases, axis=2)                                 # [O, n, f, I]
        new_shape = tf.tensor_scatter_nd_update(shape, [[axis]], [n * factor])
        static = volume.shape.as_list()
        static[axis] = None if static[axis] is None else static[axis] * factor
        volume = tf.reshape(line, new_shape)
        volume.set_shape(static)
    return volume


# XLA fuses the three passes' slices, blends and stacks into one loop (timed against the
# same ops without XLA by `python bench/warp.py`).
_upsample_xla = tf.function(_upsample, jit_compile=True, reduce_retracing=True)


def downsample_flow(flow: tf.Tensor, factor: int) -> tf.Tensor:
    """A full-resolution flow on the ``1/factor`` grid, in low-resolution voxels."""
    return downsample(flow, factor) / float(factor)


def upsample_flow(flow: tf.Tensor, factor: int) -> tf.Tensor:
    """A low-resolution flow on the full grid, in full-resolution voxels."""
    return upsample(flow, factor) * float(factor)
