"""Dense transforms: the voxel grid, affine -> flow, composition, inversion, Jacobian."""

from __future__ import annotations

import tensorflow as tf

from aldk_tf.compiled import xla

from .checks import check_volume, slice_along
from .sampling import warp


def voxel_grid(spatial_shape, centred: bool = False) -> tf.Tensor:
    """Voxel coordinates ``[D, H, W, 3]`` (float32); centred subtracts ``(n - 1) / 2``.

    ``spatial_shape`` holds ints or (symbolic) integer scalars.
    """
    axes = [tf.cast(tf.range(n), tf.float32) for n in spatial_shape]
    if centred:
        axes = [a - (tf.cast(n, tf.float32) - 1.0) / 2.0 for a, n in zip(axes, spatial_shape)]
    return tf.stack(tf.meshgrid(*axes, indexing="ij"), axis=-1)


def affine_flow(matrix: tf.Tensor, translation: tf.Tensor, spatial_shape) -> tf.Tensor:
    """Flow of the affine map ``x -> A x`` with ``A = I + matrix`` on centred coordinates.

    ``flow(c) = matrix @ c + translation`` where ``c`` is the voxel coordinate centred on
    the volume (``index - (n - 1) / 2``).

    Args:
      matrix: ``[B, 3, 3]`` (the ``W`` of ``A = W + I``).
      translation: ``[B, 3]`` in voxels.
      spatial_shape: ``(D, H, W)``.
    Returns:
      ``[B, D, H, W, 3]`` flow.
    """
    matrix = tf.convert_to_tensor(matrix, tf.float32)
    translation = tf.convert_to_tensor(translation, tf.float32)
    if matrix.shape.rank != 3 or tuple(matrix.shape[1:]) != (3, 3):
        raise ValueError(f"matrix: expected shape [B, 3, 3], got {matrix.shape}")
    if translation.shape.rank != 2 or translation.shape[-1] != 3:
        raise ValueError(f"translation: expected shape [B, 3], got {translation.shape}")
    static = [tf.get_static_value(n) for n in spatial_shape]
    if any(n is None for n in static):               # symbolic sizes: no XLA
        return _affine_flow(matrix, translation, tuple(spatial_shape))
    return _affine_flow_xla(matrix, translation, tuple(int(n) for n in static))


def _centred_axis(size, axis: int) -> tf.Tensor:
    """Centred coordinates along spatial ``axis`` (0-2), shaped ``[1, ., ., ., 1]`` to
    broadcast against ``[B, D, H, W, 3]``."""
    coordinate = tf.range(size, dtype=tf.float32) - (tf.cast(size, tf.float32) - 1.0) / 2.0
    shape = [1, 1, 1, 1, 1]
    shape[axis + 1] = -1
    return tf.reshape(coordinate, shape)


def _affine_flow(matrix, translation, spatial_shape):
    # sum_j matrix[:, i, j] c_j + t_i as three broadcast multiply-adds: under XLA one loop
    # writing the flow once (an einsum over a meshgrid reads a [D, H, W, 3] grid and runs
    # ~6x slower on a CPU).
    flow = translation[:, None, None, None, :]
    for axis in range(3):
        flow = flow + _centred_axis(spatial_shape[axis], axis) * _column(matrix, axis)
    return flow


def _column(matrix, j):
    """``matrix[:, :, j]`` shaped ``[B, 1, 1, 1, 3]`` (sliced before reshaping: TFLite
    slices at most 5-D arrays)."""
    return tf.reshape(matrix[:, :, j], [-1, 1, 1, 1, 3])


def _compose_affine(matrix, affine, flow):
    result = flow + affine
    for axis in range(3):
        result = result + flow[..., axis:axis + 1] * _column(matrix, axis)
    return result


_affine_flow_xla = xla(_affine_flow)
_compose_affine_xla = xla(_compose_affine)


def compose(aggregate_flow: tf.Tensor, flow: tf.Tensor) -> tf.Tensor:
    """Aggregate of two cascades: ``agg(x) = aggregate_flow(x + flow(x)) + flow(x)``.

    Warping by the result equals warping by ``aggregate_flow`` and then by ``flow``
    (up to interpolation), i.e. ``warp(warp(m, agg_prev), flow) ~ warp(m, result)``.
    """
    return warp(aggregate_flow, flow) + flow


def invert_flow(flow: tf.Tensor, iterations: int = 20) -> tf.Tensor:
    """The inverse of the map ``x -> x + flow(x)``, as a flow ``inverse``.

    ``y + inverse(y)`` is the ``x`` with ``x + flow(x) = y``, i.e. ``compose(flow,
    inverse)`` is (close to) zero. Solved by the fixed-point iteration
    ``inverse <- -flow(y + inverse(y))``, which converges when the flow's Lipschitz
    constant is below 1 (smooth fields of a few voxels, such as the augmentation's).
    """
    flow = tf.convert_to_tensor(flow, tf.float32)
    inverse = -flow
    for _ in range(int(iterations)):
        inverse = -warp(flow, inverse)
    return inverse


def compose_affine(matrix: tf.Tensor, affine: tf.Tensor, flow: tf.Tensor) -> tf.Tensor:
    """Exact composition after an affine first stage: ``(I + matrix) @ flow + affine``.

    Args:
      matrix: ``[B, 3, 3]`` the ``W`` of the affine stage.
      affine: ``[B, D, H, W, 3]`` the affine stage's flow.
      flow: ``[B, D, H, W, 3]`` the next cascade's flow.
    """
    return _compose_affine_xla(tf.convert_to_tensor(matrix, tf.float32),
                               tf.convert_to_tensor(affine, tf.float32),
                               tf.convert_to_tensor(flow, tf.float32))


def spatial_gradient(field: tf.Tensor) -> tf.Tensor:
    """Finite-difference derivatives along D, H, W, like ``numpy.gradient``.

    Central differences inside, one-sided at the borders (axis length >= 2).
    Returns ``[B, D, H, W, C, 3]`` where the last axis is the derivative's axis.
    """
    derivatives = []
    for axis in (1, 2, 3):
        n = field.shape[axis]
        if n is not None and n < 2:
            raise ValueError(
                f"field: every spatial axis needs length >= 2, got shape {field.shape}")
        first = slice_along(field, axis, 1, 2) - slice_along(field, axis, 0, 1)
        inner = (slice_along(field, axis, 2, None) - slice_along(field, axis, 0, -2)) / 2.0
        last = slice_along(field, axis, -1, None) - slice_along(field, axis, -2, -1)
        derivatives.append(tf.concat([first, inner, last], axis=axis))
    return tf.stack(derivatives, axis=-1)


def jacobian_determinant(flow: tf.Tensor) -> tf.Tensor:
    """Determinant of the Jacobian of ``x -> x + flow(x)``, ``[B, D, H, W]``."""
    flow = tf.convert_to_tensor(flow)
    check_volume("flow", flow, channels=3)
    jacobian = spatial_gradient(tf.cast(flow, tf.float32))      # [B, D, H, W, 3, 3]
    jacobian = jacobian + tf.eye(3)
    return tf.linalg.det(jacobian)
