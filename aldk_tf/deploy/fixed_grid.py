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
  ``grad f`` by central differences (one-sided at the borders) of ``f`` on the fixed grid,
  as :func:`aldk_tf.spatial.jacobian_determinant` and ``numpy.gradient`` take them.

``A`` only permutes, flips and scales axes (the preparation reorients without
interpolation and crops axis-aligned boxes), so the interpolation is separable: along each
axis a small ``[n_fixed, n_model]`` matrix of linear weights, applied by matrix products
instead of gathering eight corners per voxel. ``u`` is linear in ``f`` plus an affine
function of ``x`` that is a sum of one vector per axis. Everything runs in float32 over
slabs of the first axis (each with one row of ``f`` either side for the differences) so
that no full-grid temporary beyond the outputs is made.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

#: Rows of the fixed grid's first axis handled at once (bounds the temporaries).
SLAB_ROWS = 24
#: Slabs computed at once, in threads.
WORKERS = 2


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


def determinant(a) -> np.ndarray:
    """det of 3x3 matrices given as ``a[row][column]`` arrays (cofactor expansion)."""
    return (a[0][0] * (a[1][1] * a[2][2] - a[1][2] * a[2][1])
            - a[0][1] * (a[1][0] * a[2][2] - a[1][2] * a[2][0])
            + a[0][2] * (a[1][0] * a[2][1] - a[1][1] * a[2][0]))


def jacobian_determinant(flow: np.ndarray) -> np.ndarray:
    """det of the Jacobian of ``x -> x + flow(x)`` for one flow ``[D, H, W, 3]`` in voxels:
    :func:`aldk_tf.spatial.jacobian_determinant` in numpy (the same differences), for
    the model grid's statistics of one registration (64^3: 0.01 s against 0.09-0.2 s of
    eager TensorFlow ops started for this one call)."""
    components = np.moveaxis(np.asarray(flow, np.float32), -1, 0)
    matrix = [[_difference(components[row], axis) for axis in range(3)]
              for row in range(3)]
    for axis in range(3):
        matrix[axis][axis] += np.float32(1.0)
    return determinant(matrix)


class FixedGrid:
    """The model flow ``[D, H, W, 3]`` (model voxels) carried onto a fixed grid.

    ``source_to_model``: 4x4 from fixed source voxels to fixed model voxels;
    ``moving_model_affine``: the moving model grid's voxel -> world; ``fixed_affine``,
    ``shape``: the fixed scan's grid.
    """

    def __init__(self, flow: np.ndarray, source_to_model, moving_model_affine,
                 fixed_affine, shape):
        self.shape = tuple(int(n) for n in shape)
        fixed_affine = np.asarray(fixed_affine, np.float64)
        moving_model_affine = np.asarray(moving_model_affine, np.float64)
        self.axes = axis_map(source_to_model)
        order = [axis for axis, _, _ in self.axes]
        # Channels first, model axes in the order of the fixed axes they feed.
        self.flow = np.ascontiguousarray(
            np.transpose(np.asarray(flow, np.float32), (3, *order)))
        self.weights = [interpolation_matrix(scale * np.arange(n) + offset,
                                             flow.shape[axis]).astype(np.float32)
                        for (axis, scale, offset), n in zip(self.axes, self.shape)]
        self.linear = np.zeros((3, 3))                    # d(model point)/dx = A
        for i, (axis, scale, _) in enumerate(self.axes):
            self.linear[axis, i] = scale
        self.volume_ratio = (np.linalg.det(moving_model_affine[:3, :3])
                             / np.linalg.det(fixed_affine[:3, :3]))
        # u(x) = Mw3 f(x) + sum_i base[r][i][x_i]: Mw3 (A x + c) + Mw_t - (F3 x + F_t).
        self.to_world = moving_model_affine[:3, :3].astype(np.float32)
        constant = np.zeros(3)
        for axis, _, offset in self.axes:
            constant[axis] = offset
        linear_part = moving_model_affine[:3, :3] @ self.linear - fixed_affine[:3, :3]
        constant = (moving_model_affine[:3, :3] @ constant + moving_model_affine[:3, 3]
                    - fixed_affine[:3, 3])
        self.base = [[(linear_part[row, i] * np.arange(n)
                       + (constant[row] if i == 0 else 0.0)).astype(np.float32)
                      for i, n in enumerate(self.shape)] for row in range(3)]

    def slabs(self, rows: int = SLAB_ROWS):
        for start in range(0, self.shape[0], rows):
            yield start, min(start + rows, self.shape[0])

    def _apply(self, start, stop):
        """The model flow interpolated at rows ``start:stop`` of the fixed grid's first
        axis, channels first ``[3, s, n1, n2]`` in model voxels, ordered as the model's
        axes. Each of the two large steps is one matrix product (a stack of small ones is
        many times slower)."""
        first, second, third = self.weights
        values = np.einsum("sp,cpqr->csqr", first[start:stop], self.flow)
        channels, rows, middle, last = values.shape
        values = second @ values.transpose(2, 0, 1, 3).reshape(middle, -1)
        values = np.ascontiguousarray(
            values.reshape(-1, channels, rows, last).transpose(1, 2, 0, 3))
        return (values.reshape(-1, last) @ third.T).reshape(
            channels, rows, second.shape[0], third.shape[0])

    def carry(self, jacobian: bool = True):
        """``(field [X, Y, Z, 3] mm RAS float32, det [X, Y, Z] float32 or None)`` on the
        whole fixed grid, slab by slab (:data:`WORKERS` slabs at once: numpy releases the
        GIL in its array operations; each slab writes its own rows)."""
        field = np.empty((*self.shape, 3), np.float32)
        det = np.empty(self.shape, np.float32) if jacobian else None

        def fill(rows):
            start, stop = rows
            self.slab(start, stop, field[start:stop],
                      None if det is None else det[start:stop])

        with ThreadPoolExecutor(max_workers=WORKERS) as pool:
            list(pool.map(fill, self.slabs()))
        return field, det

    def slab(self, start: int, stop: int, field: np.ndarray, det: np.ndarray | None):
        """Fill ``field`` ``[s, n1, n2, 3]`` (mm RAS) and, unless None, ``det``
        ``[s, n1, n2]`` for rows ``start:stop`` of the fixed grid's first axis."""
        low, high = max(start - 1, 0), min(stop + 1, self.shape[0])
        padded = self._apply(low, high)            # one more row either side if there is
        model_flow = padded[:, start - low:stop - low]                    # [3, s, n1, n2]
        for row in range(3):
            base = self.base[row]
            value = (base[0][start:stop, None, None] + base[1][None, :, None]
                     + base[2][None, None, :])
            for axis in range(3):
                if self.to_world[row, axis] != 0.0:
                    value += self.to_world[row, axis] * model_flow[axis]
            field[..., row] = value
        if det is None:
            return
        matrix = [[None] * 3 for _ in range(3)]
        for i in range(3):
            gradient = (_difference(padded, 1)[:, start - low:stop - low] if i == 0
                        else _difference(model_flow, i + 1))     # d f / d x_i
            for row in range(3):
                if self.linear[row, i] != 0.0:
                    gradient[row] += np.float32(self.linear[row, i])
                matrix[row][i] = gradient[row]
        det[...] = determinant(matrix)
        det *= np.float32(self.volume_ratio)


def _difference(values: np.ndarray, axis: int) -> np.ndarray:
    """Derivative along ``axis`` as ``numpy.gradient`` takes it: central differences,
    one-sided at the two ends (zero along an axis of a single voxel)."""
    out = np.empty_like(values)
    size = values.shape[axis]

    def rows(first, last):
        return (slice(None),) * axis + (slice(first, last),)

    if size < 2:
        out[...] = 0.0
        return out
    inner = out[rows(1, size - 1)]
    np.subtract(values[rows(2, size)], values[rows(0, size - 2)], out=inner)
    inner *= 0.5
    np.subtract(values[rows(1, 2)], values[rows(0, 1)], out=out[rows(0, 1)])
    np.subtract(values[rows(size - 1, size)], values[rows(size - 2, size - 1)],
                out=out[rows(size - 1, size)])
    return out
