"""aldk_tf/deploy/fixed_grid.py: the model flow carried onto a fixed grid, against a dense
reference (scipy's trilinear interpolation at every fixed voxel, numpy.gradient, numpy's
determinant) on grids that permute, flip and scale the model's axes."""

import numpy as np
import pytest
from scipy import ndimage

from aldk_tf.deploy import fixed_grid
from aldk_tf.deploy.fixed_grid import FixedGrid


def grid_case(rng, shape, model, order, flips):
    """A smooth model flow and a fixed-source -> model map with the given axis order and
    flips (scales near model / fixed size), a moving model affine with a shear."""
    flow = ndimage.gaussian_filter(rng.normal(0.0, 6.0, (*model, 3)),
                                   (2, 2, 2, 0)).astype(np.float32)
    source_to_model = np.zeros((4, 4))
    source_to_model[3, 3] = 1.0
    for i, axis in enumerate(order):
        scale = 0.93 * model[axis] / shape[i]
        source_to_model[axis, i] = scale * flips[i]
        source_to_model[axis, 3] = 0.3 + (0.93 * model[axis] - 1.0 if flips[i] < 0 else 0.0)
    moving_model_affine = np.array([[2.9, 0.2, 0.0, -90.0], [0.0, 3.1, 0.0, -120.0],
                                    [0.1, 0.0, 3.0, -70.0], [0.0, 0.0, 0.0, 1.0]])
    fixed_affine = np.diag([-1.0, 1.2, 0.9, 1.0])
    fixed_affine[:3, 3] = [96.0, -130.0, -72.0]
    return flow, source_to_model, moving_model_affine, fixed_affine


def dense_reference(flow, source_to_model, moving_model_affine, fixed_affine, shape):
    """``u(x) = Mw (A x + f(A x)) - F x`` and ``det(d(p + u)/dp)`` computed voxel by voxel."""
    voxels = np.indices(shape, dtype=np.float64).reshape(3, -1)
    model_points = source_to_model[:3, :3] @ voxels + source_to_model[:3, 3:]
    sampled = np.stack([ndimage.map_coordinates(flow[..., c].astype(np.float64),
                                                model_points, order=1, mode="nearest")
                        for c in range(3)])
    moving_world = (moving_model_affine[:3, :3] @ (model_points + sampled)
                    + moving_model_affine[:3, 3:])
    fixed_world = fixed_affine[:3, :3] @ voxels + fixed_affine[:3, 3:]
    field = (moving_world - fixed_world).T.reshape(*shape, 3)
    # p + u(p) = Mw (A x + f(x)) + const as a function of x, then the chain rule to p.
    model_field = sampled.T.reshape(*shape, 3)
    by_voxel = np.stack([np.gradient(model_field, axis=i) if n > 1 else
                         np.zeros_like(model_field) for i, n in enumerate(shape)], axis=-1)
    moving_by_voxel = moving_model_affine[:3, :3] @ (source_to_model[:3, :3] + by_voxel)
    det = np.linalg.det(moving_by_voxel) / np.linalg.det(fixed_affine[:3, :3])
    return field, det


@pytest.mark.parametrize("shape, model, order, flips", [
    ((23, 19, 17), (8, 9, 10), (0, 1, 2), (1, 1, 1)),
    ((21, 18, 26), (9, 8, 7), (2, 0, 1), (-1, 1, -1)),
    ((30, 1, 12), (6, 7, 8), (1, 2, 0), (1, -1, 1)),
])
def test_carry_matches_a_dense_reference(rng, shape, model, order, flips):
    case = grid_case(rng, shape, model, order, flips)
    grid = FixedGrid(*case, shape)
    field, det = grid.carry()
    expected_field, expected_det = dense_reference(*case, shape)
    assert field.dtype == np.float32 and det.dtype == np.float32
    assert np.abs(expected_field).max() > 50.0 and np.ptp(expected_det) > 0.1
    np.testing.assert_allclose(field, expected_field, atol=2e-4)
    np.testing.assert_allclose(det, expected_det, rtol=1e-5, atol=1e-5)


def test_slab_boundaries_do_not_show(rng):
    """Differences across slab borders use the neighbouring slab's rows: any slab height
    gives the same Jacobian."""
    shape = (29, 11, 13)
    grid = FixedGrid(*grid_case(rng, shape, (7, 8, 9), (0, 1, 2), (1, 1, 1)), shape)
    field, det = grid.carry()
    for rows in (1, 2, 5):
        by_rows = np.empty_like(det)
        for start, stop in grid.slabs(rows):
            grid.slab(start, stop, np.empty((stop - start, *shape[1:], 3), np.float32),
                      by_rows[start:stop])
        np.testing.assert_allclose(by_rows, det, rtol=1e-6, atol=1e-6)


def test_without_jacobian_only_the_field(rng):
    shape = (9, 10, 11)
    grid = FixedGrid(*grid_case(rng, shape, (5, 6, 7), (0, 1, 2), (1, 1, 1)), shape)
    field, det = grid.carry(jacobian=False)
    assert det is None
    np.testing.assert_array_equal(field, grid.carry()[0])


def test_model_grid_jacobian_matches_the_library_and_numpy_gradient(rng):
    """The numpy det(J) of the register's model-grid statistics: the same numbers as
    aldk_tf.spatial.jacobian_determinant, and as numpy.gradient's Jacobian."""
    import tensorflow as tf

    from aldk_tf import spatial
    flow = rng.standard_normal((12, 9, 7, 3)).astype(np.float32)
    det = fixed_grid.jacobian_determinant(flow)
    library = spatial.jacobian_determinant(tf.constant(flow[None])).numpy()[0]
    np.testing.assert_allclose(det, library, atol=2e-5)
    jacobian = np.stack([np.stack(np.gradient(flow[..., row].astype(np.float64)), -1)
                         for row in range(3)], -2) + np.eye(3)
    np.testing.assert_allclose(det, np.linalg.det(jacobian), atol=2e-5)
    assert det.shape == flow.shape[:3] and det.dtype == np.float32
