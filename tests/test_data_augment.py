"""Free-form augmentation: distribution, the RCN release's B-spline field (against a direct
evaluation of the cubic B-spline basis) and the natural-spline option (against scipy), and
consistent image/label/landmark motion, checked against scipy references."""

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage
from scipy.interpolate import CubicSpline

from aldk_tf.data.augment import (augment_pair, bspline_matrix, free_form_flow,
                                  sample_power, transform_points, upsample_control)

CONTROL_RMS = np.sqrt(0.4 ** 2 / 7)     # RMS of sign(u)|u|^3, |u| <= 0.4^(1/3), per unit scale


def _cubic_bspline(t):
    """The centred cubic B-spline basis function (support [-2, 2]), evaluated piecewise."""
    t = np.abs(t)
    return np.where(t < 1, 2 / 3 - t ** 2 + t ** 3 / 2,
                    np.where(t < 2, (2 - t) ** 3 / 6, 0.0))


def _bspline_reference(size, controls):
    """[size, controls] weights: control k at voxel k * size / (controls - 1) - 0.5."""
    position = (np.arange(size) + 0.5) * (controls - 1) / size     # in control spacings
    return _cubic_bspline(position[:, None] - np.arange(controls)[None, :])


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


@pytest.mark.parametrize("size", [32, 64, 17, 13])
def test_bspline_matrix_matches_the_cubic_bspline_basis(size):
    weights = bspline_matrix(size, 5)
    reference = _bspline_reference(size, 5)
    np.testing.assert_allclose(weights, reference, atol=1e-6)
    # with the two zero-padding controls (at -1 and 5) the weights sum to one everywhere
    position = (np.arange(size) + 0.5) * 4 / size
    padding = _cubic_bspline(position + 1) + _cubic_bspline(position - 5)
    np.testing.assert_allclose(weights.sum(axis=1) + padding, 1.0, atol=1e-6)
    assert padding[0] > 0.1 and padding[-1] > 0.1


def test_bspline_pads_the_grid_with_zeros():
    # the field over 32 voxels is the middle of the field over 48 voxels whose grid has one
    # more control point on each side, set to zero (same spacing: 8 voxels)
    np.testing.assert_allclose(bspline_matrix(48, 7)[8:40, 1:6], bspline_matrix(32, 5),
                               atol=1e-6)
    # a uniform control grid moves the inside rigidly but fades over the outer spacing
    # (8 voxels, where the padding controls at -8.5 and 39.5 reach) towards the faces
    size = 32
    uniform = np.ones([1, 5, 5, 5, 1], np.float32)
    field = upsample_control(uniform, (size,) * 3, "bspline").numpy()[0, ..., 0]
    np.testing.assert_allclose(field[8:24, 8:24, 8:24], 1.0, atol=1e-5)
    assert np.all(np.diff(field[:9, 16, 16]) > 0) and np.all(np.diff(field[23:, 16, 16]) < 0)
    face = 1.0 - _cubic_bspline(1 + 0.5 / 8)                      # about 0.86
    np.testing.assert_allclose(field[0, 16, 16], face, atol=1e-5)
    np.testing.assert_allclose(field[16, 16, -1], face, atol=1e-5)
    np.testing.assert_allclose(field[0, 0, 0], face ** 3, atol=1e-5)   # about 0.64
    assert field.min() == pytest.approx(face ** 3, abs=1e-5)
    # the natural spline through the knots keeps the translation up to the faces
    np.testing.assert_allclose(upsample_control(uniform, (size,) * 3, "spline"), 1.0,
                               atol=1e-5)


@pytest.mark.parametrize("interpolation", ["bspline", "spline"])
def test_free_form_flow_is_seeded_and_uses_the_chosen_interpolation(interpolation):
    size = (17, 21, 13)
    flow = free_form_flow(2, size, 11, interpolation).numpy()
    assert flow.shape == (2, *size, 3)
    np.testing.assert_array_equal(flow, free_form_flow(2, size, 11, interpolation).numpy())
    assert not np.allclose(flow, free_form_flow(2, size, 12, interpolation).numpy())
    bound = 0.4 * np.array([n // 4 for n in size])
    assert np.all(np.abs(flow).max(axis=(0, 1, 2, 3)) <= 1.25 * bound)
    control = sample_power([2, 5, 5, 5, 3], 11).numpy() * np.array([n // 4 for n in size])
    np.testing.assert_allclose(flow, upsample_control(control, size, interpolation).numpy(),
                               atol=1e-5)


def test_augmentation_defaults_to_the_bspline():
    np.testing.assert_array_equal(free_form_flow(1, (16, 12, 8), 5),
                                  free_form_flow(1, (16, 12, 8), 5, "bspline"))
    flow = augment_pair({"moving": tf.zeros([1, 16, 12, 8, 1])}, 5,
                        return_flow=True)["augment_flow"]
    np.testing.assert_array_equal(flow, free_form_flow(1, (16, 12, 8), 5, "bspline"))
    with pytest.raises(ValueError, match="interpolation"):
        free_form_flow(1, (8, 8, 8), 0, "linear")


def test_spline_passes_through_the_control_grid():
    size = (17, 21, 13)                       # knots at 0, 4, 8, 12, 16 on the first axis
    control = sample_power([2, 5, 5, 5, 3], 11).numpy() * np.array([n // 4 for n in size])
    cube = upsample_control(control, (17, 17, 17), "spline").numpy()
    np.testing.assert_allclose(cube[:, ::4, ::4, ::4], control, atol=1e-4)
    # reference: scipy's natural cubic spline applied along each axis in turn
    reference = control
    for axis, n in zip((1, 2, 3), size):
        knots = np.linspace(0, n - 1, 5)
        reference = CubicSpline(knots, reference, axis=axis, bc_type="natural")(np.arange(n))
    np.testing.assert_allclose(upsample_control(control, size, "spline").numpy(), reference,
                               atol=1e-4)
    # upsample_control's default stays the natural spline (the demo dataset relies on it)
    np.testing.assert_array_equal(upsample_control(control, size),
                                  upsample_control(control, size, "spline"))


def test_field_statistics_match_the_release():
    """At 32^3 the release's field is weak: RMS of a component about 0.33 x the control
    values' RMS, largest |component| about 1.3 voxels on average; the spline's is stronger."""
    size, fields = 32, 64
    statistics = {}
    for interpolation in ("bspline", "spline"):
        component = free_form_flow(fields, (size,) * 3, 5, interpolation).numpy()[..., 0]
        rms_factor = np.sqrt(np.mean(component ** 2)) / (CONTROL_RMS * (size // 4))
        mean_max = np.abs(component).max(axis=(1, 2, 3)).mean()
        statistics[interpolation] = rms_factor, mean_max
    rms_factor, mean_max = statistics["bspline"]
    assert rms_factor == pytest.approx(0.33, abs=0.03)
    assert mean_max == pytest.approx(1.3, abs=0.2)
    spline_rms_factor, spline_mean_max = statistics["spline"]
    assert spline_rms_factor == pytest.approx(0.76, abs=0.06)
    assert spline_mean_max == pytest.approx(3.4, abs=0.4)
    assert spline_rms_factor > 2 * rms_factor and spline_mean_max > 2 * mean_max
    # the B-spline weights give the same factor exactly (independent controls, separable)
    weights = _bspline_reference(size, 5)
    assert np.sqrt(np.mean((weights ** 2).sum(axis=1))) ** 3 == pytest.approx(0.330, abs=0.002)


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


@pytest.mark.parametrize("interpolation", ["bspline", "spline"])
def test_augmentation_moves_image_labels_and_landmarks_together(interpolation):
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
    # seed 0 moves the landmark by over a voxel with either field
    result = augment_pair(batch, tf.random.Generator.from_seed(0), return_flow=True,
                          interpolation=interpolation)
    flow = result["augment_flow"].numpy()[0]
    np.testing.assert_array_equal(
        flow, free_form_flow(1, (size,) * 3, tf.random.Generator.from_seed(0),
                             interpolation)[0])
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


def test_augmented_target_registers_the_deformed_pair():
    # The adjusted flow t' must satisfy x + t'(x) + a(x + t'(x)) = x + t(x): the deformed
    # moving image sampled at x + t'(x) is the original one at x + t(x). Checked with
    # scipy sampling of the augmentation field a.
    size = (24, 24, 24)
    rng = np.random.default_rng(3)
    noise = rng.normal(size=(*size, 3))
    target = np.stack([ndimage.gaussian_filter(noise[..., c], 4.0) for c in range(3)], -1)
    target = (1.5 * target / np.abs(target).max()).astype(np.float32)[None]
    batch = {"moving": np.zeros((1, *size, 1), np.float32), "teacher_flow": target}
    augmented = augment_pair(batch, 0, return_flow=True)
    field = augmented["augment_flow"].numpy()[0]
    assert np.abs(field).max() > 1.0

    def residual(flow):
        grid = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), -1)
        where = (grid + flow).reshape(-1, 3).T
        moved = np.stack([ndimage.map_coordinates(field[..., c], where, order=1,
                                                  mode="nearest").reshape(size)
                          for c in range(3)], -1)
        return np.abs(flow + moved - target[0])[4:-4, 4:-4, 4:-4]

    assert residual(augmented["teacher_flow"].numpy()[0]).max() < 0.05
    assert residual(target[0]).max() > 0.5          # the stored flow alone is wrong
