"""Random free-form deformation of the moving image, its segmentation and its landmarks.

The field follows the RCN release (``network/transform.py`` and ``network/framework.py`` of
microsoft/Recursive-Cascaded-Networks). A control grid of 5 x 5 x 5 displacement vectors,
each component drawn from a power-3 distribution on [-0.4, 0.4] (``sign(u) * |u|**3`` with
``u`` uniform, so small values are the most likely) and multiplied by ``image_size // 4``
along its axis, is turned into a full-resolution flow by a uniform cubic B-spline, one axis
at a time (:func:`bspline_matrix`):

- the ``g`` control points of an axis of ``n`` voxels are spaced ``s = n / (g - 1)`` voxels
  apart and the first one sits on the outer face of voxel 0, so control ``k`` is at voxel
  coordinate ``k * s - 0.5`` and the last one on the outer face of voxel ``n - 1``;
- every control point beyond the grid counts as zero (the release pads the grid with one
  zero on each side, which is all a cubic B-spline can reach from inside the volume);
- voxel ``x`` takes ``sum_k c_k B((x + 0.5) / s - k)``, ``B`` the centred cubic B-spline
  (support ``[-2, 2]``, ``B(0) = 2/3``).

The B-spline approximates the control values rather than passing through them (at a
control point it gives ``(c_{k-1} + 4 c_k + c_{k+1}) / 6``), so displacements are much
smaller than the control values: at 32^3 the RMS of one component is about a third of the
control values' RMS (0.76 for the natural spline below). The zero padding fades the field
over the outermost spacing: a uniform control grid gives its value inside but about 86 % of
it on a face and 64 % at a corner. (For independent random control values the RMS near the
faces is still about that inside, as inner voxels average more controls.)

The release requires ``n`` to be a multiple of ``g - 1``; here any ``n`` works (fractional
spacing), and for multiples the weights are the release's exactly. (The release also
transposes the first two spatial axes of its field when reassembling it, which changes
nothing in distribution for the cubic volumes it trains on; it is not reproduced.)

``interpolation="spline"`` selects the older, stronger field instead: a natural cubic spline
through the control values with control points at ``linspace(0, n - 1, g)``
(:func:`spline_matrix`); its displacements reach the control values and do not fade at the
faces. :func:`upsample_control` keeps that spline as its default because the demo dataset
(:mod:`aldk_tf.data.demo_set`) builds its subjects with it.

The moving image is warped with :func:`aldk_tf.spatial.warp`, i.e.
``moving'(x) = moving(x + flow(x))``, its segmentation with
:func:`aldk_tf.spatial.warp_labels` (rule ``"largest"`` over the dataset's labels, or
``"nearest"`` without a label list). A landmark at ``p`` in the moving image therefore
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

CONTROL_GRID = (5, 5, 5)
CONTROL_RANGE = 0.4
CONTROL_POWER = 3
POINT_ITERATIONS = 30
INTERPOLATIONS = ("bspline", "spline")


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
def bspline_matrix(size: int, controls: int) -> np.ndarray:
    """``[size, controls]`` weights of the RCN release's uniform cubic B-spline.

    Control ``k`` sits at voxel coordinate ``k * size / (controls - 1) - 0.5`` and the grid is
    continued by zeros (see the module docstring). Row ``x`` gives the field at voxel ``x``
    as a weighted sum of the control values; rows near the ends sum to less than 1.
    """
    spacing = size / (controls - 1.0)
    position = (np.arange(size, dtype=np.float64) + 0.5) / spacing   # in control spacings
    cell = np.floor(position).astype(int)           # x lies between controls cell, cell + 1
    u = position - cell                             # in [0, 1)
    segment = np.stack([(1.0 - u) ** 3,                                # control cell - 1
                        3.0 * u ** 3 - 6.0 * u ** 2 + 4.0,             # control cell
                        -3.0 * u ** 3 + 3.0 * u ** 2 + 3.0 * u + 1.0,  # control cell + 1
                        u ** 3], axis=1) / 6.0                         # control cell + 2
    padded = np.zeros((size, controls + 2))         # columns: controls -1 .. controls
    rows = np.arange(size)
    for offset in range(4):
        padded[rows, cell + offset] = segment[:, offset]
    return padded[:, 1:-1].astype(np.float32)       # the padding zeros contribute nothing


@functools.lru_cache(maxsize=32)
def spline_matrix(size: int, controls: int) -> np.ndarray:
    """``[size, controls]`` weights of a natural cubic spline through ``controls`` knots.

    Knots at ``linspace(0, size - 1, controls)``; row ``x`` gives the interpolated value at
    voxel ``x`` as a weighted sum of the knot values.
    """
    knots = np.linspace(0.0, size - 1.0, controls)
    spline = CubicSpline(knots, np.eye(controls), bc_type="natural")
    return spline(np.arange(size, dtype=np.float64)).astype(np.float32)


def control_matrix(size: int, controls: int, interpolation: str) -> np.ndarray:
    """``[size, controls]`` weights of ``interpolation``: ``"bspline"`` or ``"spline"``."""
    if interpolation == "bspline":
        return bspline_matrix(size, controls)
    if interpolation == "spline":
        return spline_matrix(size, controls)
    raise ValueError(f"interpolation: expected one of {INTERPOLATIONS}, got "
                     f"{interpolation!r}")


def upsample_control(control: tf.Tensor, image_size, interpolation: str = "spline"
                     ) -> tf.Tensor:
    """Expand a control grid ``[B, g, g, g, C]`` to ``[B, D, H, W, C]`` (separable).

    ``interpolation`` is ``"spline"`` (natural cubic spline through the control values,
    the default, which the demo dataset relies on) or ``"bspline"`` (the augmentation's
    zero-padded uniform cubic B-spline, :func:`bspline_matrix`).
    """
    control = tf.convert_to_tensor(control, tf.float32)
    grid = control.shape[1:4]
    depth, height, width = (control_matrix(int(n), int(g), interpolation)
                            for n, g in zip(image_size, grid))
    field = tf.einsum("bijkc,di->bdjkc", control, depth)
    field = tf.einsum("bdjkc,hj->bdhkc", field, height)
    return tf.einsum("bdhkc,wk->bdhwc", field, width)


def free_form_flow(batch, image_size, seed_or_generator,
                   interpolation: str = "bspline") -> tf.Tensor:
    """A random free-form deformation ``[B, D, H, W, 3]`` in voxels (see module docstring).

    Args:
      batch: batch size (int or scalar tensor).
      image_size: ``(D, H, W)`` static ints.
      seed_or_generator: int seed (stateless) or ``tf.random.Generator``.
      interpolation: ``"bspline"`` (the RCN release's field, default) or ``"spline"``
        (natural cubic spline through the control values: a stronger field).
    """
    image_size = tuple(int(n) for n in image_size)
    shape = tf.stack([tf.cast(batch, tf.int32), *CONTROL_GRID, 3])
    scale = tf.constant([n // 4 for n in image_size], tf.float32)
    control = sample_power(shape, seed_or_generator) * scale      # [B, 5, 5, 5, 3]
    return upsample_control(control, image_size, interpolation)


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
        moved = tf.clip_by_value(points - spatial.sample(flow, moved), 0.0, upper)
        return iteration + 1, moved

    _, moved = tf.while_loop(lambda iteration, _: iteration < iterations, step,
                             (tf.constant(0), points))
    present = tf.reduce_all(points >= 0.0, axis=-1, keepdims=True)
    return tf.where(present, moved, -tf.ones_like(points))


def augment_pair(batch: dict, generator, label_values=None,
                 return_flow: bool = False, interpolation: str = "bspline") -> dict:
    """Deform the moving side of a batch of pairs with one random free-form flow per pair.

    ``batch`` holds ``moving`` ``[B, D, H, W, 1]`` and optionally ``moving_seg`` (same
    shape, label values), ``moving_point`` ``[B, 6, 3]`` and ``teacher_flow`` (a stored
    flow of the un-deformed pair, mapped onto the deformed one by
    :func:`augmented_target`); all other entries (the fixed side, ids) pass through
    unchanged. ``generator`` is a ``tf.random.Generator`` or int
    seed. With ``return_flow`` the flow is added as ``augment_flow``. ``interpolation``
    chooses the field (:func:`free_form_flow`): the release's B-spline by default.
    """
    moving = tf.convert_to_tensor(batch["moving"])
    image_size = moving.shape[1:4]
    if not image_size.is_fully_defined():
        raise ValueError(f"moving: augmentation needs a static spatial shape, got "
                         f"{moving.shape}")
    flow = free_form_flow(tf.shape(moving)[0], image_size.as_list(), generator,
                          interpolation)
    result = dict(batch)
    result["moving"] = spatial.warp(moving, flow)
    if "moving_seg" in batch:
        # Listed labels: the largest warped mask wins; otherwise the nearest voxel's label.
        rule = "largest" if label_values else "nearest"
        result["moving_seg"] = spatial.warp_labels(
            tf.convert_to_tensor(batch["moving_seg"], tf.float32), flow, rule, label_values)
    if "moving_point" in batch:
        result["moving_point"] = transform_points(batch["moving_point"], flow)
    if "teacher_flow" in batch:
        result["teacher_flow"] = augmented_target(batch["teacher_flow"], flow)
    if return_flow:
        result["augment_flow"] = flow
    return result


def augmented_target(target_flow: tf.Tensor, augment_flow: tf.Tensor) -> tf.Tensor:
    """A pair's flow, re-expressed for the pair whose moving image was deformed.

    ``target_flow`` registers ``(fixed, moving)``: ``moving(x + target(x)) ~ fixed(x)``.
    The augmented moving image is ``moving'(z) = moving(z + a(z))``; the flow registering
    ``(fixed, moving')`` sends ``x`` to the ``z`` with ``z + a(z) = x + target(x)``, i.e.
    ``target`` followed by the inverse of ``a``: ``compose(inverse(a), target)``. Stored
    teacher flows so stay exact targets for augmented training pairs.
    """
    target_flow = tf.cast(target_flow, tf.float32)
    inverse = spatial.invert_flow(augment_flow)
    return spatial.compose(inverse, target_flow)
