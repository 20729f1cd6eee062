"""The one trilinear sampler (edge-clamped): :func:`warp` on a flow, :func:`sample` at points.

Both find each position's cell with :func:`_cells` and interpolate with
:func:`_interpolate`; :func:`warp` runs them XLA-compiled with a hand-written gradient,
:func:`sample` XLA-compiled on request (``compiled=True``), ``mode="nearest"`` takes the
nearest voxel (:func:`_nearest`, any dtype).
"""

from __future__ import annotations

import tensorflow as tf

from aldk_tf.compiled import xla

from .checks import check_same_grid, check_volume, slice_along


MODES = ("linear", "nearest")


def warp(image: tf.Tensor, flow: tf.Tensor, mode: str = "linear") -> tf.Tensor:
    """Sample ``image`` at ``x + flow(x)``: trilinear (``"linear"``) or nearest voxel.

    Sample positions are clamped to the volume, which is the same as replicating the edge
    voxels outwards (``scipy.ndimage.map_coordinates(order=1, mode='nearest')``; ``order=0``
    for ``"nearest"``, ties rounded to even). ``"linear"`` is differentiable with respect
    to ``image`` and ``flow``; where a position was clamped the flow gets no gradient along
    that axis (as through ``tf.clip_by_value``). ``"nearest"`` keeps any dtype (label maps).

    Speed (``"linear"``): the forward pass is one XLA-compiled function (eight gathers from
    the flat, edge-padded image and the interpolation fused into one loop), the
    hand-written gradient two more; only gathers, a scatter and elementwise math, no
    convolutions. The same ops are correct without XLA, which is how TFLite conversion
    sees them (builtin ops only). ``bench/warp.py`` times it against other formulations.

    Args:
      image: ``[B, D, H, W, C]`` any float dtype (any dtype for ``"nearest"``), any
        channel count.
      flow: ``[B, D, H, W, 3]`` displacement in voxels.
      mode: ``"linear"`` or ``"nearest"``.
    Returns:
      ``[B, D, H, W, C]`` warped image, same dtype as ``image``.
    """
    image = tf.convert_to_tensor(image)
    flow = tf.convert_to_tensor(flow)
    check_volume("image", image)
    check_volume("flow", flow, channels=3)
    check_same_grid(image, flow)
    _check_mode(mode)
    if mode == "nearest":
        return _nearest(image, _flow_positions(tf.cast(flow, tf.float32)))
    # Half precision interpolates in float32, float64 in float64 (no-op casts for float32).
    compute_dtype = tf.float64 if image.dtype == tf.float64 else tf.float32
    warped = _trilinear(tf.cast(image, compute_dtype), tf.cast(flow, tf.float32))
    return tf.cast(warped, image.dtype)


def sample(image: tf.Tensor, points: tf.Tensor, mode: str = "linear",
           compiled: bool = False) -> tf.Tensor:
    """Values of ``image`` at voxel positions ``points``: the point form of :func:`warp`.

    Same interpolation and clamping as :func:`warp` (the same corner and interpolation
    code); ``points`` may lie on any grid, e.g. another image's voxels
    (``[B, X, Y, Z, 3]``) or landmarks (``[B, N, 3]``).

    Args:
      image: ``[B, D, H, W, C]``.
      points: ``[B, ..., 3]`` absolute voxel positions in ``image``.
      mode: ``"linear"`` or ``"nearest"``.
      compiled: ``"linear"`` as one XLA-compiled function (one fused loop instead of a
        full-size temporary per op: for millions of points, e.g. a whole volume's), which
        compiles once for each new pair of shapes; otherwise op by op.
    Returns:
      ``[B, ..., C]``, same dtype as ``image``.
    """
    image = tf.convert_to_tensor(image)
    points = tf.convert_to_tensor(points, tf.float32)
    check_volume("image", image)
    _check_mode(mode)
    if points.shape.rank is not None and (points.shape.rank < 2 or points.shape[-1] != 3):
        raise ValueError(f"points: expected shape [B, ..., 3], got {points.shape}")
    if mode == "nearest":
        return _nearest(image, tuple(tf.unstack(points, axis=-1)))
    compute_dtype = tf.float64 if image.dtype == tf.float64 else tf.float32
    linear = _sample_linear_xla if compiled else _sample_linear
    return tf.cast(linear(tf.cast(image, compute_dtype), points), image.dtype)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")


@tf.custom_gradient
def _trilinear(image: tf.Tensor, flow: tf.Tensor):
    """:func:`warp` on validated inputs (image float32/64, flow float32), with its gradient."""
    # Inputs cut from any tape, so that the call does not also record (and compile) its
    # own autodiff gradient, which the function below replaces.
    warped = _trilinear_forward_xla(tf.stop_gradient(image), tf.stop_gradient(flow))

    def gradient(upstream):
        corner, fractions, inside = _flow_cells_xla(flow)
        # Two compiled functions, so that a graph that needs only the flow's gradient
        # (instance optimisation, a loss on a warped input image) never runs the image's
        # scatter: TensorFlow prunes a function call whose output is not used.
        return (_image_backward_xla(image, upstream, corner, fractions),
                _flow_backward_xla(image, upstream, corner, fractions, inside))

    return warped, gradient


def _flow_positions(flow: tf.Tensor) -> tuple:
    """``x + flow(x)`` as three ``[B, D, H, W]`` tensors (positions along D, H and W)."""
    positions = []
    for axis, displacement in enumerate(tf.unstack(flow, axis=-1)):
        along_axis = [1, 1, 1, 1]
        along_axis[axis + 1] = -1
        size = tf.shape(flow)[axis + 1]
        positions.append(displacement + tf.reshape(tf.range(size, dtype=tf.float32),
                                                   along_axis))
    return tuple(positions)


def _cells(positions, image_size):
    """Where each position samples: the lower corner of its cell and the place inside it.

    Args:
      positions: ``(z, y, x)``, each ``[B, ...]`` float32 voxel positions.
      image_size: ``(D, H, W)`` of the sampled image.
    Returns:
      corner: ``[B, ...]`` int32 flat index of the cell's lower corner in the image
        padded by one voxel at the end of each spatial axis (see :func:`_pad_end`).
      fractions: ``(z, y, x)``, each ``[B, ...]`` float32 in ``[0, 1]``.
      inside: ``(z, y, x)``, each ``[B, ...]`` bool, False where the position was
        clamped (no flow gradient there).
    """
    lower, fractions, inside = [], [], []
    for axis, position in enumerate(positions):
        last = tf.cast(image_size[axis] - 1, tf.float32)
        inside.append((position >= 0.0) & (position <= last))
        position = tf.clip_by_value(position, 0.0, last)
        index = tf.cast(position, tf.int32)                     # floor: position >= 0
        lower.append(index)
        fractions.append(position - tf.cast(index, tf.float32))
    depth, height, width = image_size[0], image_size[1], image_size[2]
    corner = (lower[0] * (height + 1) + lower[1]) * (width + 1) + lower[2]
    corner += _batch_offsets(corner, (depth + 1) * (height + 1) * (width + 1))
    return corner, tuple(fractions), tuple(inside)


def _flow_cells(flow: tf.Tensor):
    """:func:`_cells` for :func:`warp`: positions ``x + flow(x)`` on the flow's own grid."""
    return _cells(_flow_positions(flow), tf.shape(flow)[1:4])


def _batch_offsets(index: tf.Tensor, volume) -> tf.Tensor:
    """``b * volume`` for batch element ``b``, shaped to broadcast against ``index``."""
    offsets = tf.range(tf.shape(index)[0]) * volume
    return tf.reshape(offsets, [-1] + [1] * (index.shape.rank - 1))


def _nearest(image: tf.Tensor, positions) -> tf.Tensor:
    """The nearest voxel's value (ties to even, indices clamped), any dtype."""
    size = tf.shape(image)[1:4]
    index = 0
    for axis, position in enumerate(positions):
        last = tf.cast(size[axis] - 1, tf.float32)
        index = index * size[axis] + tf.cast(tf.clip_by_value(tf.round(position), 0.0, last),
                                             tf.int32)
    index += _batch_offsets(index, tf.reduce_prod(size))
    return tf.gather(tf.reshape(image, [-1, tf.shape(image)[4]]), index)


def _pad_end(image: tf.Tensor) -> tf.Tensor:
    """``image`` with the last voxel repeated once along D, H and W.

    Every cell's upper corners then exist; where they fall in the padding, the position
    sits on the last voxel and their interpolation weight is exactly 0.
    """
    return tf.pad(image, [[0, 0], [0, 1], [0, 1], [0, 1], [0, 0]], mode="SYMMETRIC")


def _corner_offsets(image_shape) -> list:
    """Flat offsets of the 8 cell corners in the padded image, in (dz, dy, dx) order."""
    row = image_shape[3] + 1
    plane = (image_shape[2] + 1) * row
    return [dz * plane + dy * row + dx for dz in (0, 1) for dy in (0, 1) for dx in (0, 1)]


def _lerp(a, b, t):
    return a + t * (b - a)


def _interpolate(image: tf.Tensor, corner: tf.Tensor, fractions) -> tf.Tensor:
    """The trilinear sampler: ``image`` interpolated in the cells :func:`_cells` found."""
    flat = tf.reshape(_pad_end(image), [-1, tf.shape(image)[4]])      # [voxels, C]
    v = [tf.gather(flat, corner + offset) for offset in _corner_offsets(tf.shape(image))]
    tz, ty, tx = [tf.cast(f, image.dtype)[..., None] for f in fractions]
    # Along x, then y, then z; a fraction of exactly 0 returns the lower corner exactly.
    return _lerp(_lerp(_lerp(v[0], v[1], tx), _lerp(v[2], v[3], tx), ty),
                 _lerp(_lerp(v[4], v[5], tx), _lerp(v[6], v[7], tx), ty), tz)


def _sample_linear(image: tf.Tensor, points: tf.Tensor) -> tf.Tensor:
    """:func:`sample` (``"linear"``) on validated inputs."""
    positions = tuple(tf.unstack(points, axis=-1))
    return _interpolate(image, *_cells(positions, tf.shape(image)[1:4])[:2])


def _trilinear_forward(image: tf.Tensor, flow: tf.Tensor) -> tf.Tensor:
    corner, fractions, _ = _flow_cells(flow)
    return _interpolate(image, corner, fractions)


def _flow_backward(image, upstream, corner, fractions, inside):
    """Gradient of ``sum(upstream * warp(image, flow))`` with respect to the flow.

    The derivative along an axis is the bilinear interpolation (over the other two axes)
    of the image's forward difference along that axis, from the cell's lower face; 4
    gathers per axis. The difference is 0 at the last voxel and in the padding; where a
    position was clamped along an axis, that axis gets no gradient."""
    channels = tf.shape(image)[4]
    offsets = _corner_offsets(tf.shape(image))
    t = [tf.cast(f, image.dtype)[..., None] for f in fractions]   # z, y, x: [B, D, H, W, 1]
    padded = _pad_end(image)
    flow_gradient = []
    for axis in range(3):
        difference = (slice_along(padded, axis + 1, 1, None)
                      - slice_along(padded, axis + 1, 0, -1))
        difference = tf.pad(difference, [[0, 0]] + [[0, int(a == axis)] for a in range(3)]
                            + [[0, 0]])
        difference = tf.reshape(difference, [-1, channels])
        lower_face = [k for k in range(8) if not (k >> (2 - axis)) & 1]
        v = [tf.gather(difference, corner + offsets[k]) for k in lower_face]
        first, second = [t[a] for a in range(3) if a != axis]
        derivative = _lerp(_lerp(v[0], v[1], second), _lerp(v[2], v[3], second), first)
        flow_gradient.append(
            tf.where(inside[axis], tf.reduce_sum(upstream * derivative, axis=-1), 0.0))
    return tf.cast(tf.stack(flow_gradient, axis=-1), tf.float32)


def _image_backward(image, upstream, corner, fractions):
    """Gradient of ``sum(upstream * warp(image, flow))`` with respect to the image: the
    adjoint of the eight gathers, ``upstream * weight`` scatter-added to each corner (all
    eight corners in one scatter)."""
    shape = tf.shape(image)
    channels = shape[4]
    offsets = _corner_offsets(shape)
    tz, ty, tx = [tf.cast(f, image.dtype)[..., None] for f in fractions]
    weighted = [upstream * wz * wy * wx for wz in (1.0 - tz, tz) for wy in (1.0 - ty, ty)
                for wx in (1.0 - tx, tx)]
    padded_shape = shape + tf.constant([0, 1, 1, 1, 0])
    padded_gradient = tf.tensor_scatter_nd_add(
        tf.zeros([tf.reduce_prod(padded_shape[:4]), channels], image.dtype),
        tf.reshape(corner[..., None] + tf.stack(offsets), [-1, 1]),  # [B*D*H*W*8, 1]
        tf.reshape(tf.stack(weighted, axis=-2), [-1, channels]))     # [B*D*H*W*8, C]
    # The padding only ever got weight 0; drop it.
    return tf.reshape(padded_gradient, padded_shape)[:, :-1, :-1, :-1]


def _trilinear_backward(image, upstream, corner, fractions, inside):
    """Gradients of ``sum(upstream * warp(image, flow))`` for image and flow."""
    return (_image_backward(image, upstream, corner, fractions),
            _flow_backward(image, upstream, corner, fractions, inside))


_trilinear_forward_xla = xla(_trilinear_forward)
_sample_linear_xla = xla(_sample_linear, reduce_retracing=False)
_flow_cells_xla = xla(_flow_cells)
_flow_backward_xla = xla(_flow_backward)
_image_backward_xla = xla(_image_backward)
