"""Free-form augmentation: distribution, interpolation, and consistent image/label/landmark
motion, checked against scipy references."""

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage
from scipy.interpolate import CubicSpline

from aldk_tf.data.augment import (augment_pair, free_form_flow, sample_points,
                                  sample_power, transform_points, upsample_control,
                                  warp_labels)


def _at(field, points):
    """scipy reference: trilinear values of ``field`` [D, H, W, C] at points [N, 3]."""
    return np.stack([ndimage.map_coordinates(field[..., c], points.T, order=1,
                                             mode="nearest")
                     for c in range(field.shape[-1])], axis=-1)


def _scipy_warp(volume, flow, order):
    """scipy reference warp: sample ``volume`` [D, H, W] at x + flow(x), edge-clamped."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in volume.shape], indexing="ij"), -1)
    position = np.clip(grid + flow, 0, np.array(volume.shape) - 1)
    return ndimage.map_coordinates(volume, np.moveaxis(position, -1, 0), order=order,
                                   mode="nearest")


def test_power_distribution():
    values = sample_power([200_000], 7).numpy()
    assert values.min() >= -0.4 and values.max() <= 0.4
    for t in (0.004, 0.05, 0.2):
        expected = (t / 0.4) ** (1 / 3)                 # P(|v| <= t) for the power-3 law
        assert abs(np.mean(np.abs(values) <= t) - expected) < 0.01
    assert abs(np.mean(values > 0) - 0.5) < 0.01
    generator_values = sample_power([1000], tf.random.Generator.from_seed(1)).numpy()
    assert np.abs(generator_values).max() <= 0.4


def test_free_form_flow_interpolates_the_control_grid():
    size = (17, 21, 13)                       # knots at 0, 4, 8, 12, 16 on the first axis
    flow = free_form_flow(2, size, 11).numpy()
    assert flow.shape == (2, *size, 3)
    np.testing.assert_array_equal(flow, free_form_flow(2, size, 11).numpy())
    assert not np.allclose(flow, free_form_flow(2, size, 12).numpy())
    bound = 0.4 * np.array([n // 4 for n in size])
    assert np.all(np.abs(flow).max(axis=(0, 1, 2, 3)) <= 1.25 * bound)
    control = sample_power([2, 5, 5, 5, 3], 11).numpy() * np.array([n // 4 for n in size])
    cube = upsample_control(control, (17, 17, 17)).numpy()
    np.testing.assert_allclose(cube[:, ::4, ::4, ::4], control, atol=1e-4)
    # reference: scipy's natural cubic spline applied along each axis in turn
    reference = control
    for axis, n in zip((1, 2, 3), size):
        knots = np.linspace(0, n - 1, 5)
        reference = CubicSpline(knots, reference, axis=axis, bc_type="natural")(np.arange(n))
    np.testing.assert_allclose(upsample_control(control, size).numpy(), reference,
                               atol=1e-4)


def test_sample_points_matches_scipy(rng):
    field = rng.normal(size=(2, 9, 10, 11, 3)).astype(np.float32)
    points = rng.uniform(-1, 11, (2, 7, 3)).astype(np.float32)   # some outside: clamped
    sampled = sample_points(field, points).numpy()
    for b in range(2):
        np.testing.assert_allclose(sampled[b], _at(field[b], points[b]), atol=1e-5)


def test_transform_points_inverts_the_warp(rng):
    flow = free_form_flow(2, (24, 24, 24), 3).numpy()
    points = rng.uniform(4, 20, (2, 6, 3)).astype(np.float32)
    points[1, 4:] = -1.0                                             # absent landmarks
    moved = transform_points(points, flow).numpy()
    for b in range(2):
        present = points[b, :, 0] >= 0
        q = moved[b, present]
        np.testing.assert_allclose(q + _at(flow[b], q), points[b, present], atol=1e-3)
    np.testing.assert_array_equal(moved[1, 4:], -1.0)


def test_warp_labels_nearest_matches_scipy(rng):
    labels = rng.choice([0, 3, 7], (1, 12, 12, 12, 1)).astype(np.float32)
    flow = rng.normal(0, 2, (1, 12, 12, 12, 3)).astype(np.float32)
    nearest = warp_labels(labels, flow).numpy()[0, ..., 0]
    np.testing.assert_array_equal(nearest, _scipy_warp(labels[0, ..., 0], flow[0], 0))
    smooth_flow = free_form_flow(1, (12, 12, 12), 4).numpy()
    by_mask = warp_labels(labels, smooth_flow, label_values=[3, 7]).numpy()
    assert set(np.unique(by_mask)) <= {0.0, 3.0, 7.0}
    assert np.mean(by_mask == warp_labels(labels, smooth_flow).numpy()) > 0.6


def test_augmentation_moves_image_labels_and_landmarks_together():
    size = 32
    p = np.array([13.3, 17.6, 15.2])
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"), -1).astype(np.float32)
    distance = np.linalg.norm(grid - p, axis=-1)
    blob = np.exp(-distance ** 2 / (2 * 1.5 ** 2)).astype(np.float32)
    ball = np.where(distance <= 3.5, 2.0, 0.0).astype(np.float32)
    points = np.full((1, 6, 3), -1.0, np.float32)
    points[0, 0] = p
    batch = {"fixed": tf.zeros([1, size, size, size, 1]), "moving": blob[None, ..., None],
             "moving_seg": ball[None, ..., None], "moving_point": points}
    result = augment_pair(batch, tf.random.Generator.from_seed(2), return_flow=True)
    flow = result["augment_flow"].numpy()[0]
    q = result["moving_point"].numpy()[0, 0]
    assert np.linalg.norm(q - p) > 1.0                              # it really moved
    np.testing.assert_array_equal(result["moving_point"].numpy()[0, 1:], -1.0)
    np.testing.assert_allclose(q + _at(flow, q[None])[0], p, atol=1e-3)
    # the image is the scipy warp of the blob, and the blob's centre sits at q
    image = result["moving"].numpy()[0, ..., 0]
    np.testing.assert_allclose(image, _scipy_warp(blob, flow, 1), atol=1e-5)
    weights = np.where(image > 0.2, image, 0.0)
    centre = (grid * weights[..., None]).sum(axis=(0, 1, 2)) / weights.sum()
    assert np.linalg.norm(centre - q) < 0.5
    # the label ball moved with it, by nearest-neighbour warp
    label = result["moving_seg"].numpy()[0, ..., 0]
    np.testing.assert_array_equal(label, _scipy_warp(ball, flow, 0))
    assert set(np.unique(label)) == {0.0, 2.0}
    assert np.linalg.norm(grid[label == 2].mean(axis=0) - q) < 0.75
    np.testing.assert_array_equal(result["fixed"], batch["fixed"])


def test_augment_pair_runs_inside_dataset_map():
    generator = tf.random.Generator.from_seed(0)
    data = tf.data.Dataset.from_tensors({
        "moving": tf.ones([2, 8, 8, 8, 1]), "moving_seg": tf.ones([2, 8, 8, 8, 1]),
        "moving_point": tf.fill([2, 6, 3], 4.0)})
    out = next(iter(data.map(lambda b: augment_pair(b, generator, label_values=[1]))))
    assert out["moving"].shape == (2, 8, 8, 8, 1)
    np.testing.assert_allclose(out["moving"], 1.0, atol=1e-6)
    np.testing.assert_array_equal(out["moving_seg"], 1.0)
    with pytest.raises(ValueError, match="static spatial shape"):
        tf.function(lambda m: augment_pair({"moving": m}, 0)["moving"]).get_concrete_function(
            tf.TensorSpec([None, None, 8, 8, 1]))
