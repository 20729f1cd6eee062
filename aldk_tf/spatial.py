"""Pure tensor functions for dense spatial transforms.

Everything that moves voxels lives here, once: the voxel grid, the trilinear warp with
edge clamping, the affine-matrix-to-flow map, flow composition and the Jacobian
determinant. Models, losses, metrics, augmentation and exporters all call these.

Conventions (see DESIGN.md): tensors are channels-last ``[B, D, H, W, C]``; a flow is
``[B, D, H, W, 3]`` in voxels and channel ``i`` is the displacement along array axis
``i``; warping samples the moving image at ``x + flow(x)``.
"""

from __future__ import annotations

import tensorflow as tf


def _check_volume(name: str, tensor: tf.Tensor, channels: int | None = None) -> None:
    """Raise ``ValueError`` unless ``tensor`` is a 5-D channels-last volume."""
    shape = tensor.shape
    if shape.rank != 5:
        raise ValueError(
            f"{name}: expected a 5-D tensor [B, D, H, W, C], got rank {shape.rank} "
            f"with shape {shape}")
    if channels is not None and shape[-1] is not None and shape[-1] != channels:
        raise ValueError(
            f"{name}: expected {channels} channels in the last axis, got shape {shape}")


def _check_same_grid(image: tf.Tensor, flow: tf.Tensor) -> None:
    image_grid, flow_grid = image.shape[1:4], flow.shape[1:4]
    if image_grid.is_fully_defined() and flow_grid.is_fully_defined() and \
            image_grid != flow_grid:
        raise ValueError(
            f"flow: expected spatial shape {image_grid.as_list()} to match the image, "
            f"got {flow_grid.as_list()}")


def voxel_grid(spatial_shape, centred: bool = False) -> tf.Tensor:
    """Voxel coordinates ``[D, H, W, 3]`` (float32); centred subtracts ``(n - 1) / 2``."""
    axes = [tf.range(n, dtype=tf.float32) for n in spatial_shape]
    if centred:
        axes = [a - (float(n) - 1.0) / 2.0 for a, n in zip(axes, spatial_shape)]
    return tf.stack(tf.meshgrid(*axes, indexing="ij"), axis=-1)


def warp(image: tf.Tensor, flow: tf.Tensor) -> tf.Tensor:
    """Sample ``image`` at ``x + flow(x)`` with trilinear interpolation.

    Sample positions are clamped to the volume, which is the same as replicating the edge
    voxels outwards (``scipy.ndimage.map_coordinates(order=1, mode='nearest')``).

    The eight neighbours of every voxel are stacked once (edge-padded shifts of the
    image), so the interpolation needs a single gather of ``8 * C`` values per voxel.

    Args:
      image: ``[B, D, H, W, C]`` any float dtype, any channel count.
      flow: ``[B, D, H, W, 3]`` displacement in voxels.
    Returns:
      ``[B, D, H, W, C]`` warped image, same dtype as ``image``.
    """
    image = tf.convert_to_tensor(image)
    flow = tf.convert_to_tensor(flow)
    _check_volume("image", image)
    _check_volume("flow", flow, channels=3)
    _check_same_grid(image, flow)
    flow = tf.cast(flow, tf.float32)
    dtype = image.dtype
    shape = tf.shape(image)
    batch, depth, height, width, channels = (shape[0], shape[1], shape[2], shape[3],
                                             shape[4])

    # Sample positions, clamped to [0, n - 1] per axis.       # [B, D, H, W, 3]
    size = tf.cast(tf.stack([depth, height, width]), tf.float32)
    grid = voxel_grid_dynamic(depth, height, width)
    position = tf.clip_by_value(grid[None] + flow, 0.0, size - 1.0)
    base = tf.floor(position)
    fraction = position - base                                  # [B, D, H, W, 3]
    base = tf.cast(base, tf.int32)

    # The 8 corner values of each cell, one edge-padded shift per corner.
    padded = tf.pad(image, [[0, 0], [0, 1], [0, 1], [0, 1], [0, 0]], mode="SYMMETRIC")
    corners = tf.concat(
        [padded[:, dz:dz + depth, dy:dy + height, dx:dx + width, :]
         for dz in (0, 1) for dy in (0, 1) for dx in (0, 1)],
        axis=-1)                                                # [B, D, H, W, 8C]
    corners = tf.reshape(corners, [-1, 8, channels])            # [B*D*H*W, 8, C]

    voxels = depth * height * width
    index = ((base[..., 0] * height + base[..., 1]) * width + base[..., 2])
    index = index + tf.range(batch)[:, None, None, None] * voxels
    sampled = tf.gather(corners, tf.reshape(index, [-1]))       # [N, 8, C]

    fz, fy, fx = tf.unstack(tf.reshape(fraction, [-1, 3]), axis=-1)
    wz = tf.stack([1.0 - fz, fz], axis=-1)[:, :, None, None]
    wy = tf.stack([1.0 - fy, fy], axis=-1)[:, None, :, None]
    wx = tf.stack([1.0 - fx, fx], axis=-1)[:, None, None, :]
    weights = tf.reshape(wz * wy * wx, [-1, 8, 1])              # [N, 8, 1]
    warped = tf.reduce_sum(sampled * tf.cast(weights, dtype), axis=1)
    return tf.reshape(warped, shape)


def voxel_grid_dynamic(depth, height, width) -> tf.Tensor:
    """Like :func:`voxel_grid` for (possibly symbolic) integer sizes."""
    axes = [tf.cast(tf.range(n), tf.float32) for n in (depth, height, width)]
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
    centred = voxel_grid(spatial_shape, centred=True)          # [D, H, W, 3]
    flow = tf.einsum("bij,dhwj->bdhwi", matrix, centred)
    return flow + translation[:, None, None, None, :]


def compose(aggregate_flow: tf.Tensor, flow: tf.Tensor) -> tf.Tensor:
    """Aggregate of two cascades: ``agg(x) = aggregate_flow(x + flow(x)) + flow(x)``.

    Warping by the result equals warping by ``aggregate_flow`` and then by ``flow``
    (up to interpolation), i.e. ``warp(warp(m, agg_prev), flow) ~ warp(m, result)``.
    """
    return warp(aggregate_flow, flow) + flow


def compose_affine(matrix: tf.Tensor, affine: tf.Tensor, flow: tf.Tensor) -> tf.Tensor:
    """Exact composition after an affine first stage: ``(I + matrix) @ flow + affine``.

    Args:
      matrix: ``[B, 3, 3]`` the ``W`` of the affine stage.
      affine: ``[B, D, H, W, 3]`` the affine stage's flow.
      flow: ``[B, D, H, W, 3]`` the next cascade's flow.
    """
    return flow + tf.einsum("bij,bdhwj->bdhwi", matrix, flow) + affine


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
        first = _slice(field, axis, 1, 2) - _slice(field, axis, 0, 1)
        inner = (_slice(field, axis, 2, None) - _slice(field, axis, 0, -2)) / 2.0
        last = _slice(field, axis, -1, None) - _slice(field, axis, -2, -1)
        derivatives.append(tf.concat([first, inner, last], axis=axis))
    return tf.stack(derivatives, axis=-1)


def _slice(tensor, axis, start, stop):
    index = [slice(None)] * tensor.shape.rank
    index[axis] = slice(start, stop)
    return tensor[tuple(index)]


def jacobian_determinant(flow: tf.Tensor) -> tf.Tensor:
    """Determinant of the Jacobian of ``x -> x + flow(x)``, ``[B, D, H, W]``."""
    flow = tf.convert_to_tensor(flow)
    _check_volume("flow", flow, channels=3)
    jacobian = spatial_gradient(tf.cast(flow, tf.float32))      # [B, D, H, W, 3, 3]
    jacobian = jacobian + tf.eye(3)
    return tf.linalg.det(jacobian)


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
    _check_volume("volume", volume)
    _check_factor(volume, factor, downsampling=True)
    if factor == 1:
        return volume
    for axis in (1, 2, 3):
        shape = tf.shape(volume)
        outer = tf.reduce_prod(shape[:axis]) * (shape[axis] // factor)
        inner = tf.reduce_prod(shape[axis + 1:])
        blocks = tf.reshape(volume, tf.stack([outer, factor, inner]))
        new_shape = tf.tensor_scatter_nd_update(shape, [[axis]], [shape[axis] // factor])
        volume = tf.reshape(tf.reduce_mean(blocks, axis=1), new_shape)
    return volume


def upsample(volume: tf.Tensor, factor: int) -> tf.Tensor:
    """Trilinear upsampling by an integer factor on cell-centred grids, edges clamped.

    Full-resolution voxel ``x`` samples the low-resolution volume at
    ``u = (x + 0.5) / f - 0.5`` (the inverse of :func:`downsample`'s block layout), done
    as three separable 1-D passes of shifted slices (no gathers).
    """
    volume = tf.convert_to_tensor(volume)
    _check_volume("volume", volume)
    _check_factor(volume, factor, downsampling=False)
    if factor == 1:
        return volume
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
        volume = tf.reshape(line, new_shape)
    return volume


def downsample_flow(flow: tf.Tensor, factor: int) -> tf.Tensor:
    """A full-resolution flow on the ``1/factor`` grid, in low-resolution voxels."""
    return downsample(flow, factor) / float(factor)


def upsample_flow(flow: tf.Tensor, factor: int) -> tf.Tensor:
    """A low-resolution flow on the full grid, in full-resolution voxels."""
    return upsample(flow, factor) * float(factor)


def resample(image: tf.Tensor, coordinate: tf.Tensor, batch) -> tf.Tensor:
    """Sample ``image`` ``[B, D, H, W, C]`` at absolute voxel ``coordinate`` ``[d, h, w, 3]``.

    The output grid may differ in size from the input; same clamping as :func:`warp`.
    """
    shape = tf.shape(image)
    channels = shape[4]
    size = tf.cast(shape[1:4], tf.float32)
    position = tf.clip_by_value(coordinate, 0.0, size - 1.0)
    lower = tf.floor(position)
    fraction = position - lower
    lower = tf.cast(lower, tf.int32)
    upper = tf.minimum(lower + 1, shape[1:4] - 1)
    out = 0.0
    for corner in range(8):
        pick = [(corner >> (2 - axis)) & 1 for axis in range(3)]
        index = tf.stack([upper[..., a] if p else lower[..., a]
                          for a, p in enumerate(pick)], axis=-1)
        weight = 1.0
        for a, p in enumerate(pick):
            weight = weight * (fraction[..., a] if p else 1.0 - fraction[..., a])
        values = tf.gather_nd(image, tf.broadcast_to(
            index[None], tf.concat([[batch], tf.shape(index)], 0)), batch_dims=1)
        out = out + values * tf.cast(weight[None, ..., None], image.dtype)
    del channels
    return out
