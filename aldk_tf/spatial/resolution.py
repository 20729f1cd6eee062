"""Integer-factor down- and upsampling of volumes and flows (cell-centred grids)."""

from __future__ import annotations

import tensorflow as tf

from aldk_tf.compiled import xla

from .checks import check_volume
from .sampling import _trilinear_forward


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
    if volume.shape[1:].is_fully_defined():
        return _block_mean_static_xla(volume, int(factor))
    return _block_mean(volume, int(factor))


def _block_mean_static(volume: tf.Tensor, factor: int) -> tf.Tensor:
    """:func:`_block_mean` in two reductions of at most 5-D views (TFLite's limit): first
    over the D and H block axes, then over W's. Half the time of three passes under XLA."""
    shape = tf.shape(volume)           # constants for XLA, which compiles per shape
    batch, depth, height, width, channels = (shape[i] for i in range(5))
    rows = tf.reshape(volume, tf.stack([batch * (depth // factor), factor, height // factor,
                                        factor, width * channels]))
    rows = tf.reduce_mean(rows, axis=[1, 3])                 # [B D/f, H/f, W C]
    cells = tf.reshape(rows, tf.stack([-1, factor, channels]))
    return tf.reshape(tf.reduce_mean(cells, axis=1),
                      tf.stack([batch, depth // factor, height // factor, width // factor,
                                channels]))


def _block_mean(volume: tf.Tensor, factor: int) -> tf.Tensor:
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


_block_mean_static_xla = xla(_block_mean_static)


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
_upsample_xla = xla(_upsample)


def downsample_flow(flow: tf.Tensor, factor: int) -> tf.Tensor:
    """A full-resolution flow on the ``1/factor`` grid, in low-resolution voxels."""
    return downsample(flow, factor) / float(factor)


def upsample_flow(flow: tf.Tensor, factor: int) -> tf.Tensor:
    """A low-resolution flow on the full grid, in full-resolution voxels."""
    return upsample(flow, factor) * float(factor)


def upsample_flow_and_warp(image: tf.Tensor, low_flow: tf.Tensor,
                           factor: int) -> tuple[tf.Tensor, tf.Tensor]:
    """``(flow, warp(image, flow))`` with ``flow = upsample_flow(low_flow, factor)``, in
    one XLA loop (the cross-resolution model's last step at inference).

    Same numbers as the two calls (up to float rounding); the upsampled flow is computed
    where the warp reads it instead of being written and read back. No hand-written
    gradient: for inference (training uses :func:`upsample_flow` and
    :func:`~aldk_tf.spatial.warp`).

    Args:
      image: ``[B, D, H, W, C]`` float32, ``(D, H, W)`` = ``factor`` x the flow's grid.
      low_flow: ``[B, D / f, H / f, W / f, 3]`` in low-resolution voxels.
    Returns:
      flow ``[B, D, H, W, 3]`` (full-resolution voxels) and the warped image.
    """
    image = tf.convert_to_tensor(image, tf.float32)
    low_flow = tf.convert_to_tensor(low_flow, tf.float32)
    check_volume("image", image)
    check_volume("low_flow", low_flow, channels=3)
    _check_factor(low_flow, factor, downsampling=False)
    expected = [None if n is None else n * int(factor) for n in low_flow.shape[1:4]]
    if any(a is not None and b is not None and a != b
           for a, b in zip(expected, image.shape[1:4])):
        raise ValueError(f"image: spatial shape {image.shape[1:4].as_list()} is not "
                         f"{factor} x low_flow's {low_flow.shape[1:4].as_list()}")
    return _upsample_and_warp_xla(image, low_flow, int(factor))


def _upsample_and_warp(image, low_flow, factor):
    # upsample_flow's arithmetic on the un-compiled passes: a nested XLA function would
    # hand back a tensor of unknown rank under reduce_retracing.
    flow = _upsample(low_flow, factor) * float(factor) if factor > 1 else low_flow
    return flow, _trilinear_forward(image, flow)


_upsample_and_warp_xla = xla(_upsample_and_warp)
