"""The network's result carried from the model's grid onto the fixed scan's own grid.

The network sees both scans prepared (RAS-reoriented, cropped, resampled to the model's
size): model voxel ``v`` of the fixed scan corresponds to model voxel ``v + flow(v)`` of
the moving scan. On the fixed scan's grid (index ``x``, world ``F x``), with ``A`` the
map from fixed source voxels to fixed model voxels and ``Mw`` the moving model grid's
affine:

- ``f(x)``: the model flow trilinearly interpolated (edge-clamped) at ``v = A x``;
- the world displacement ``u(x) = Mw (A x + f(x)) - F x`` (mm, RAS), which is what
  ``flow.nii.gz`` stores (LPS: x and y negated);
- the moving scan sampled at its voxels ``Mov^-1 (F x + u(x))``
  (:func:`aldk_tf.deploy.warp.moving_voxels`, as ``aldk-warp`` does, so both give the
  same numbers);
- the Jacobian determinant of ``p -> p + u(p)``: ``det(Mw) / det(F) * det(A + grad f)``,
  ``grad f`` by central differences (one-sided at the borders) on the fixed grid, as
  :func:`aldk_tf.spatial.jacobian_determinant` takes them.

``A`` only permutes, flips and scales axes (the preparation reorients without
interpolation and crops axis-aligned boxes), so the interpolation is separable: along each
axis a small ``[n_fixed, n_model]`` matrix of linear weights, applied by matrix products
instead of gathering eight corners per voxel; the finite differences of ``f`` are the same
products with a difference matrix in front. Everything runs over slabs of the first axis
so that no full-grid temporary beyond the outputs is made.
"""

from __future__ import annotations

import numpy as np

from aldk_tf.deploy import warp

#: Rows of the fixed grid's first axis handled at once (bounds the temporaries).
SLAB_ROWS = 24


def axis_map(source_to_model: np.ndarray, tolerance: float = 1e-6):
    """For each fixed-grid axis ``i``: ``(model axis, scale, offset)`` with model coordinate
    ``scale * x_i + offset``; ValueError if the map is not a permutation with scales."""
    matrix = np.asarray(source_to_model, np.float64)[:3, :3]
    size = np.abs(matrix).max()
    axes = []
    for i in range(3):
        column = np.abs(matrix[:, i])
        model_axis = int(np.argmax(column))
        off = np.delete(column, model_axis)
        if column[model_axis] <= tolerance * size or (off > tolerance * size).any():
            raise ValueError("the fixed scan's grid maps to the model grid with a rotation; "
                             "expected axis permutations, flips and scales only")
        axes.append((model_axis, float(matrix[model_axis, i]),
                     float(source_to_model[model_axis, 3])))
    if sorted(axis for axis, _, _ in axes) != [0, 1, 2]:
        raise ValueError("the fixed scan's grid does not map its axes one to one onto the "
                         "model grid's")
    return axes


def interpolation_matrix(positions: np.ndarray, length: int) -> np.ndarray:
    """``[len(positions), length]`` linear weights of positions clamped to ``[0, length-1]``
    (the trilinear sampler's rule, one axis)."""
    positions = np.clip(np.asarray(positions, np.float64), 0.0, length - 1.0)
    low = np.floor(positions).astype(np.int64)
    high = np.minimum(low + 1, length - 1)
    weight = positions - low
    matrix = np.zeros((len(positions), length), np.float64)
    rows = np.arange(len(positions))
    np.add.at(matrix, (rows, low), 1.0 - weight)
    np.add.at(matrix, (rows, high), weight)
    return matrix


def difference_matrix(length: int) -> np.ndarray:
    """``[length, length]`` derivative along an axis as ``numpy.gradient`` takes it."""
    matrix = np.zeros((length, length), np.float64)
    if length < 2:
        return matrix
    matrix[0, :2] = (-1.0, 1.0)
    matrix[-1, -2:] = (-1.0, 1.0)
    for row in range(1, length - 1):
        matrix[row, row - 1], matrix[row, row + 1] = -0.5, 0.5
    return matrix


def determinant(a) -> np.ndarray:
    """det of 3x3 matrices given as ``a[row][column]`` arrays (cofactor expansion)."""
    return (a[0][0] * (a[1][1] * a[2][2] - a[1][2] * a[2][1])
            - a[0][1] * (a[1][0] * a[2][2] - a[1][2] * a[2][0])
            + a[0][2] * (a[1][0] * a[2][1] - a[1][1] * a[2][0]))


class FixedGrid:
    """The model flow ``[D, H, W, 3]`` (model voxels) carried onto a fixed grid.

    ``source_to_model``: 4x4 from fixed source voxels to fixed model voxels;
    ``moving_model_affine``: the moving model grid's voxel -> world; ``fixed_affine``,
    ``shape``: the fixed scan's grid.
    """

    def __init__(self, flow: np.ndarray, source_to_model, moving_model_affine,
                 fixed_affine, shape):
        self.shape = tuple(int(n) for n in shape)
        self.fixed_affine = np.asarray(fixed_affine, np.float64)
        self.moving_model_affine = np.asarray(moving_model_affine, np.float64)
        self.axes = axis_map(source_to_model)
        order = [axis for axis, _, _ in self.axes]
        # Channels first, model axes in the order of the fixed axes they feed.
        self.flow = np.ascontiguousarray(
            np.transpose(np.asarray(flow, np.float32), (3, *order)))
        self.weights, self.differences = [], []
        for (axis, scale, offset), n in zip(self.axes, self.shape):
            weights = interpolation_matrix(scale * np.arange(n) + offset, flow.shape[axis])
            self.weights.append(weights.astype(np.float32))
            self.differences.append((difference_matrix(n) @ weights).astype(np.float32))
        self.linear = np.zeros((3, 3))                    # d(model point)/dx = A
        for i, (axis, scale, _) in enumerate(self.axes):
            self.linear[axis, i] = scale
        self.volume_ratio = (np.linalg.det(self.moving_model_affine[:3, :3])
                             / np.linalg.det(self.fixed_affine[:3, :3]))

    def slabs(self, rows: int = SLAB_ROWS):
        for start in range(0, self.shape[0], rows):
            yield start, min(start + rows, self.shape[0])

    def _apply(self, first, second, third, start, stop):
        """The model flow through one matrix per axis (rows ``start:stop`` of the first),
        channels first ``[3, s, n1, n2]`` in model voxels, ordered as the model's axes.
        Each of the two large steps is one matrix product (a stack of small ones is many
        times slower)."""
        values = np.einsum("sp,cpqr->csqr", first[start:stop], self.flow)
        channels, rows, middle, last = values.shape
        values = second @ values.transpose(2, 0, 1, 3).reshape(middle, -1)
        values = np.ascontiguousarray(
            values.reshape(-1, channels, rows, last).transpose(1, 2, 0, 3))
        return (values.reshape(-1, last) @ third.T).reshape(
            channels, rows, second.shape[0], third.shape[0])

    def slab(self, start: int, stop: int, jacobian: bool = True):
        """``(field [s, n1, n2, 3] mm RAS float32, det [s, n1, n2] float32 or None)``."""
        weights, differences = self.weights, self.differences
        model_flow = self._apply(*weights, start, stop)
        # Model point of each fixed voxel: A x + f(x), on the model's axes (channels last).
        points = np.empty((stop - start, *self.shape[1:], 3), np.float64)
        for i, (axis, scale, offset) in enumerate(self.axes):
            index = np.arange(start, stop) if i == 0 else np.arange(self.shape[i])
            shape = [1, 1, 1]
            shape[i] = len(index)
            points[..., axis] = model_flow[axis] + (scale * index + offset).reshape(shape)
        moving_world = points @ self.moving_model_affine[:3, :3].T \
            + self.moving_model_affine[:3, 3]
        field = (moving_world - warp.fixed_world(self.fixed_affine, self.shape, start, stop)
                 ).astype(np.float32)
        if not jacobian:
            return field, None
        matrix = [[None] * 3 for _ in range(3)]
        for i in range(3):
            chosen = list(weights)
            chosen[i] = differences[i]
            gradient = self._apply(*chosen, start, stop)       # d f / d x_i, [3, s, n1, n2]
            for row in range(3):
                matrix[row][i] = gradient[row] + self.linear[row, i]
        det = determinant(matrix) * self.volume_ratio
        return field, det.astype(np.float32)
