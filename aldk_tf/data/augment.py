"""Random free-form deformation of the moving image, its segmentation and its landmarks.

As in the RCN release: a control grid of 5 x 5 x 5 displacement vectors, each component
drawn from a power-3 distribution on [-0.4, 0.4] (``sign(u) * |u|**3`` with ``u`` uniform,
so small values are the most likely) and multiplied by ``image_size // 4`` along its axis,
is interpolated to full resolution with a natural cubic spline along each axis (the spline
passes through the control values; control points sit at ``linspace(0, n - 1, 5)``).

The moving image and its segmentation are warped with :func:`aldk_tf.spatial.warp`, i.e.
``moving'(x) = moving(x + flow(x))``. A landmark at ``p`` in the moving image therefore
moves to the ``q`` with ``q + flow(q) = p``; :func:`transform_points` solves this by the
fixed-point iteration ``q <- p - flow(q)`` (``flow`` sampled trilinearly at ``q``), which
converges when the flow's Lipschitz constant is below 1 (true for these fields in practice).

Everything here is pure TensorFlow and can run inside ``tf.data.Dataset.map``.
"""

from __future__ import annotations

import functools

import numpy as np
import tensorflow as tf
from scipy.interpolate import CubicSpline

from aldk_tf import spatial
from aldk_tf.spatial import sample_points  # noqa: F401  (re-exported)

CONTROL_GRID = (5, 5, 5)
CONTROL_RANGE = 0.4
CONTROL_POWER = 3
POINT_ITERATIONS = 30


def sample_power(shape, seed_or_generator, bound: float = CONTROL_RANGE,
                 power: int = CONTROL_POWER) -> tf.Tensor:
    """Values in ``[-bound, bound]`` distributed as ``sign(u) |u|**power``, ``u`` uniform.

    ``P(|v| <= t) = (t / bound) ** (1 / power)``. ``seed_or_generator`` is an int (stateless,
    deterministic per seed) or a ``tf.random.Generator``.
    """
    radius = bound ** (1.0 / power)
    if isinstance(seed_or_generator, tf.random.Generator):
        uniform = seed_or_generator.uniform(shape, -radius, radius)
    else:
        uniform = tf.random.stateless_uniform(
            shape, seed=tf.stack([tf.cast(seed_or_generator, tf.int64),
                                  tf.constant(0, tf.int64)]),
            minval=-radius, maxval=radius)
    return tf.sign(uniform) * tf.abs(uniform) ** power


@functools.lru_cache(maxsize=32)
def spline_matrix(size: int, controls: int) -> np.ndarray:
    """``[size, controls]`` weights of a natural cubic spline through ``controls`` knots.

    Knots at ``linspace(0, size - 1, controls)``; row ``x`` gives the interpolated value at
    voxel ``x`` as a weighted sum of the knot values.
    """
    knots = np.linspace(0.0, size - 1.0, controls)
    spline = CubicSpline(knots, np.eye(controls), bc_type="natural")
    return spline(np.arange(size, dtype=np.float64)).astype(np.float32)


def upsample_control(control: tf.Tensor, image_size) -> tf.Tensor:
    """Interpolate a control grid ``[B, g, g, g, C]`` to ``[B, D, H, W, C]`` (separable)."""
    control = tf.convert_to_tensor(control, tf.float32)
    grid = control.shape[1:4]
    depth, height, width = (spline_matrix(int(n), int(g)) for n, g in zip(image_size, grid))
    field = tf.einsum("bijkc,di->bdjkc", control, depth)
    field = tf.einsum("bdjkc,hj->bdhkc", field, height)
    return tf.einsum("bdhkc,wk->bdhwc", field, width)


def free_form_flow(batch, image_size, seed_or_generator) -> tf.Tensor:
    """A random free-form deformation ``[B, D, H, W, 3]`` in voxels (see module docstring).

    Args:
      batch: batch size (int or scalar tensor).
      image_size: ``(D, H, W)`` static ints.
      seed_or_generator: int seed (stateless) or ``tf.random.Generator``.
    """
    image_size = tuple(int(n) for n in image_size)
    shape = tf.stack([tf.cast(batch, tf.int32), *CONTROL_GRID, 3])
    scale = tf.constant([n // 4 for n in image_size], tf.float32)
    control = sample_power(shape, seed_or_generator) * scale      # [B, 5, 5, 5, 3]
    return upsample_control(control, image_size)


def transform_points(points: tf.Tensor, flow: tf.Tensor,
                     iterations: int = POINT_ITERATIONS) -> tf.Tensor:
    """Where landmarks of an image end up after warping it by ``flow``.

    Solves ``q + flow(q) = p`` for each landmark ``p`` (``[B, N, 3]`` voxels) by the
    fixed-point iteration ``q <- p - flow(q)``; results are clamped to the volume. Rows
    with a negative coordinate (absent landmarks, stored as -1) stay ``-1``.
    """
    points = tf.convert_to_tensor(points, tf.float32)
    flow = tf.convert_to_tensor(flow, tf.float32)
    upper = tf.cast(tf.shape(flow)[1:4] - 1, tf.float32)

    def step(iteration, moved):
        moved = tf.clip_by_value(points - sample_points(flow, moved), 0.0, upper)
        return iteration + 1, moved

    _, moved = tf.while_loop(lambda iteration, _: iteration < iterations, step,
                             (tf.constant(0), points))
    present = tf.reduce_all(points >= 0.0, axis=-1, keepdims=True)
    return tf.where(present, moved, -tf.ones_like(points))


def warp_labels(segmentation: tf.Tensor, flow: tf.Tensor, label_values=None) -> tf.Tensor:
    """Warp a label volume ``[B, D, H, W, 1]`` by ``flow`` without mixing label values.

    Without ``label_values``: nearest neighbour, i.e. :func:`aldk_tf.spatial.warp` with
    the flow rounded so that every sample position is a voxel centre. With
    ``label_values`` (e.g. ``config.label_values``): each label's mask (and the
    background's) is warped trilinearly and every voxel takes the label of the largest
    warped mask; values not listed count as background (0).
    """
    segmentation = tf.convert_to_tensor(segmentation, tf.float32)
    flow = tf.convert_to_tensor(flow, tf.float32)
    if not label_values:
        shape = tf.shape(flow)
        grid = spatial.voxel_grid_dynamic(shape[1], shape[2], shape[3])[None]
        size = tf.cast(shape[1:4] - 1, tf.float32)
        nearest = tf.clip_by_value(tf.round(grid + flow), 0.0, size) - grid
        return spatial.warp(segmentation, nearest)
    values = tf.constant([0.0] + [float(v) for v in label_values if v != 0], tf.float32)
    masks = tf.cast(tf.equal(segmentation, values), tf.float32)  # [B, D, H, W, L + 1]
    masks = tf.concat([1.0 - tf.reduce_sum(masks[..., 1:], -1, keepdims=True),
                       masks[..., 1:]], axis=-1)
    warped = spatial.warp(masks, flow)
    return tf.gather(values, tf.argmax(warped, axis=-1))[..., None]


def augment_pair(batch: dict, generator, label_values=None,
                 return_flow: bool = False) -> dict:
    """Deform the moving side of a batch of pairs with one random free-form flow per pair.

    ``batch`` holds ``moving`` ``[B, D, H, W, 1]`` and optionally ``moving_seg`` (same
    shape, label values) and ``moving_point`` ``[B, 6, 3]``; all other entries (the fixed
    side, ids) pass through unchanged. ``generator`` is a ``tf.random.Generator`` or int
    seed. With ``return_flow`` the flow is added as ``augment_flow``.
    """
    moving = tf.convert_to_tensor(batch["moving"])
    image_size = moving.shape[1:4]
    if not image_size.is_fully_defined():
        raise ValueError(f"moving: augmentation needs a static spatial shape, got "
                         f"{moving.shape}")
    flow = free_form_flow(tf.shape(moving)[0], image_size.as_list(), generator)
    result = dict(batch)
    result["moving"] = spatial.warp(moving, flow)
    if "moving_seg" in batch:
        result["moving_seg"] = warp_labels(batch["moving_seg"], flow, label_values)
    if "moving_point" in batch:
        result["moving_point"] = transform_points(batch["moving_point"], flow)
    if return_flow:
        result["augment_flow"] = flow
    return result
