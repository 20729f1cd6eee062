import numpy as np
import pytest

from aldk_tf import metrics, spatial


def reference_dice(a, b):
    a, b = a.ravel().astype(bool), b.ravel().astype(bool)
    return 2 * np.sum(a & b) / (np.sum(a) + np.sum(b))


def test_dice_and_jaccard_per_label(rng):
    seg_a = rng.integers(0, 4, (2, 10, 10, 10, 1))
    seg_b = rng.integers(0, 4, (2, 10, 10, 10, 1))
    labels = [1, 2, 3]
    a, b = metrics.segmentation_masks(seg_a, labels), metrics.segmentation_masks(seg_b,
                                                                                 labels)
    d, j = metrics.dice(a, b), metrics.jaccard(a, b)
    for s in range(2):
        for i, v in enumerate(labels):
            expected = reference_dice(seg_a[s] == v, seg_b[s] == v)
            assert d[s, i] == pytest.approx(expected)
            assert j[s, i] == pytest.approx(expected / (2 - expected))


def test_binary_mask_threshold():
    seg = np.zeros((1, 4, 4, 4, 1))
    seg[0, :2] = 255
    masks = metrics.segmentation_masks(seg)
    assert masks.shape == (1, 4, 4, 4, 1) and masks.sum() == 32


def test_identity_registration_gives_perfect_dice(rng):
    seg = rng.integers(0, 3, (1, 8, 8, 8, 1)).astype(np.float32)
    flow = np.zeros((1, 8, 8, 8, 3), np.float32)
    result = metrics.pair_metrics(seg, seg, flow, label_values=[1, 2])
    np.testing.assert_allclose(result["dice"], 1.0)
    np.testing.assert_allclose(result["jacobian_det_std"], 0.0, atol=1e-6)
    np.testing.assert_allclose(result["folding_percent"], 0.0)


def test_warp_segmentation_translation():
    seg = np.zeros((1, 8, 8, 8, 1), np.float32)
    seg[0, 2:4, 2:4, 2:4] = 2
    flow = np.zeros((1, 8, 8, 8, 3), np.float32)
    flow[..., 0] = 1.0           # samples moving at z + 1: content moves to z - 1
    warped = metrics.warp_segmentation(seg, flow, [2])
    assert warped[0, 1:3, 2:4, 2:4, 0].all() and warped.sum() == 8


def test_landmark_distance():
    flow = np.zeros((1, 8, 8, 8, 3), np.float32)
    flow[..., 2] = 2.0
    fixed = np.array([[[1, 1, 1], [3, 3, 3], [-1, -1, -1]]], np.float32)
    moving = np.array([[[1, 1, 3], [3, 3, 6], [2, 2, 2]]], np.float32)
    # First maps exactly, second is 1 voxel off, third is absent.
    np.testing.assert_allclose(metrics.landmark_distance(fixed, moving, flow), [0.5])


def test_folding_percentage():
    flow = np.zeros((1, 8, 8, 8, 3), np.float32)
    flow[..., 0] = -1.5 * np.arange(8)[:, None, None]   # d(z + u)/dz = -0.5
    stats = metrics.jacobian_statistics(flow)
    np.testing.assert_allclose(stats["folding_percent"], 100.0)
    determinant = spatial.jacobian_determinant(flow).numpy()
    np.testing.assert_allclose(determinant, -0.5, atol=1e-6)


def brute_force_surface_distances(a, b, spacing):
    """HD95 and mean surface distance by enumerating surface voxel pairs (numpy only)."""
    def surface_points(mask):
        padded = np.pad(mask, 1)
        inside = np.ones_like(mask)
        for axis in range(3):
            for step in (-1, 1):
                inside &= np.roll(padded, step, axis)[1:-1, 1:-1, 1:-1]
        return np.argwhere(mask & ~inside) * np.asarray(spacing)

    points_a, points_b = surface_points(a), surface_points(b)
    distances = np.linalg.norm(points_a[:, None] - points_b[None], axis=-1)
    a_to_b, b_to_a = distances.min(axis=1), distances.min(axis=0)
    hd95 = max(np.percentile(a_to_b, 95), np.percentile(b_to_a, 95))
    return hd95, np.concatenate([a_to_b, b_to_a]).mean()


@pytest.mark.parametrize("shape, spacing", [((9, 10, 11), (1.0, 1.0, 1.0)),
                                            ((12, 8, 10), (0.8, 1.5, 2.5))])
def test_hd95_and_surface_distance_match_brute_force(rng, shape, spacing):
    for _ in range(3):
        a = rng.random(shape) < 0.35
        b = np.zeros(shape, bool)
        b[2:-3, 1:-2, 3:-1] = True
        b &= rng.random(shape) < 0.8
        hd95, mean = metrics.surface_distances(a, b, spacing)
        expected_hd95, expected_mean = brute_force_surface_distances(a, b, spacing)
        assert hd95 == pytest.approx(expected_hd95, abs=1e-6)
        assert mean == pytest.approx(expected_mean, abs=1e-6)


def test_surface_distance_of_a_shifted_cube_and_empty_masks():
    a = np.zeros((12, 12, 12), bool)
    a[3:8, 3:8, 3:8] = True
    b = np.roll(a, 2, axis=0)
    hd95, _ = metrics.surface_distances(a, b, (2.0, 1.0, 1.0))
    assert hd95 == pytest.approx(4.0)                   # 2 voxels of 2 mm
    assert metrics.surface_distances(a, a)[0] == 0.0
    assert np.isnan(metrics.surface_distances(a, np.zeros_like(a))).all()


def test_surface_distances_of_small_masks_in_a_large_volume(rng):
    """The distance transforms run on the box around both surfaces: same numbers."""
    a, b = np.zeros((24, 20, 22), bool), np.zeros((24, 20, 22), bool)
    a[3:9, 12:17, 4:8] = rng.random((6, 5, 4)) < 0.7
    b[5:11, 10:15, 5:10] = rng.random((6, 5, 5)) < 0.7
    spacing = (1.2, 0.7, 2.0)
    expected = brute_force_surface_distances(a, b, spacing)
    np.testing.assert_allclose(metrics.surface_distances(a, b, spacing), expected,
                               atol=1e-6)


def test_landmark_distance_in_mm_uses_the_moving_affine():
    """A zero flow, moving landmark 1 voxel off along axes 0 and 2 of a 2 x 1 x 3 mm grid
    (rotated: the norm must not change): TRE = sqrt(2^2 + 3^2) mm."""
    fixed = np.array([[[4.0, 4.0, 4.0]]])
    moving = fixed + [[[1.0, 0.0, 1.0]]]
    flow = np.zeros((1, 8, 8, 8, 3), np.float32)
    rotation = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([2.0, 1.0, 3.0])
    assert metrics.landmark_distance(fixed, moving, flow)[0] == pytest.approx(np.sqrt(2))
    assert metrics.landmark_distance(fixed, moving, flow, affine[None])[0] == \
        pytest.approx(np.sqrt(13.0))
