import warnings

import numpy as np
import pytest
import scipy.ndimage as ndimage
import tensorflow as tf

from aldk_tf import spatial
from aldk_tf.spatial import sampling


def scipy_warp(image, flow, order=1):
    """Independent reference: map_coordinates(order, mode='nearest') per channel."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in image.shape[1:4]],
                                indexing="ij"), axis=-1)
    return scipy_sample(image, grid + flow, order)


def scipy_sample(image, points, order=1):
    """Independent reference: ``image`` [B, D, H, W, C] at ``points`` [B, ..., 3]."""
    out = np.empty(points.shape[:-1] + image.shape[-1:], image.dtype)
    for b in range(image.shape[0]):
        coords = np.moveaxis(points[b], -1, 0)
        for c in range(image.shape[-1]):
            out[b, ..., c] = ndimage.map_coordinates(image[b, ..., c], coords, order=order,
                                                     mode="nearest")
    return out


@pytest.mark.parametrize("shape", [(1, 16, 16, 16, 1), (2, 12, 10, 14, 3), (3, 8, 9, 7, 2)])
@pytest.mark.parametrize("scale", [0.7, 4.0, 25.0])
def test_warp_matches_scipy(rng, shape, scale):
    image = rng.random(shape).astype(np.float32)
    flow = (rng.standard_normal(shape[:4] + (3,)) * scale).astype(np.float32)
    np.testing.assert_allclose(spatial.warp(image, flow).numpy(), scipy_warp(image, flow),
                               atol=1e-5)


def test_warp_outside_volume_replicates_edges(rng):
    image = rng.random((1, 8, 8, 8, 1)).astype(np.float32)
    flow = np.full((1, 8, 8, 8, 3), -50.0, np.float32)
    out = spatial.warp(image, flow).numpy()
    np.testing.assert_allclose(out, np.full_like(out, image[0, 0, 0, 0, 0]), atol=1e-6)
    flow = np.full((1, 8, 8, 8, 3), 50.0, np.float32)
    out = spatial.warp(image, flow).numpy()
    np.testing.assert_allclose(out, np.full_like(out, image[0, -1, -1, -1, 0]), atol=1e-6)


def test_identity_flow_is_exact(rng):
    image = rng.random((2, 9, 11, 10, 4)).astype(np.float32)
    out = spatial.warp(image, np.zeros(image.shape[:4] + (3,), np.float32)).numpy()
    np.testing.assert_array_equal(out, image)


def test_integer_translation(rng):
    image = rng.random((1, 10, 10, 10, 1)).astype(np.float32)
    flow = np.zeros((1, 10, 10, 10, 3), np.float32)
    flow[..., 1] = 2.0
    out = spatial.warp(image, flow).numpy()
    np.testing.assert_array_equal(out[:, :, :-2], image[:, :, 2:])


def test_gradients_reach_image_and_flow(rng):
    image = tf.Variable(rng.random((1, 8, 8, 8, 1)).astype(np.float32))
    flow = tf.Variable((rng.standard_normal((1, 8, 8, 8, 3)) * 1.5).astype(np.float32))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(spatial.warp(image, flow) ** 2)
    grad_image, grad_flow = tape.gradient(loss, [image, flow])
    assert grad_image is not None and grad_flow is not None
    assert np.abs(grad_image.numpy()).sum() > 0
    assert np.abs(grad_flow.numpy()).sum() > 0


def test_flow_gradient_matches_finite_difference(rng):
    image = tf.constant(rng.random((1, 6, 6, 6, 1)).astype(np.float32))
    flow = (rng.standard_normal((1, 6, 6, 6, 3)) * 0.8).astype(np.float32)
    flow_var = tf.Variable(flow)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(spatial.warp(image, flow_var))
    grad = tape.gradient(loss, flow_var).numpy()
    eps = 1e-3
    for index in [(0, 2, 3, 1, 0), (0, 4, 1, 2, 1), (0, 3, 3, 3, 2)]:
        up, down = flow.copy(), flow.copy()
        up[index] += eps
        down[index] -= eps
        numeric = (spatial.warp(image, up).numpy().sum()
                   - spatial.warp(image, down).numpy().sum()) / (2 * eps)
        assert abs(numeric - grad[index]) < 2e-2


def gradients(warp, image, flow, upstream):
    image, flow = tf.constant(image), tf.constant(flow)
    with tf.GradientTape() as tape:
        tape.watch([image, flow])
        loss = tf.reduce_sum(upstream * warp(image, flow))
    return [g.numpy() for g in tape.gradient(loss, [image, flow])]


def edge_case_flow(rng, shape):
    """Random flow with some positions far outside, on voxel centres and on the border."""
    flow = rng.standard_normal(shape[:4] + (3,)) * 2.0
    flow[:, 0] = 30.0                                           # clamped at the far end
    flow[:, 1, ..., 1] = -40.0                                  # clamped at 0 along H
    flow[:, 2] = np.round(flow[:, 2])                           # voxel centres
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape[1:4]], indexing="ij"), -1)
    flow[:, 3] = -grid[3]                                       # exactly at index 0
    flow[:, 4] = np.array(shape[1:4]) - 1.0 - grid[4]           # exactly at index n - 1
    return flow.astype(np.float32)


def test_custom_gradient_matches_autodiff_of_plain_ops(rng):
    """warp's gradient (XLA, hand-written) equals autodiff through the forward's own ops
    run without XLA, including clamped positions and positions on voxels and borders."""
    shape = (2, 7, 8, 6, 2)
    image = rng.random(shape).astype(np.float32)
    flow = edge_case_flow(rng, shape)
    upstream = rng.standard_normal(shape).astype(np.float32)
    expected = gradients(sampling._trilinear_forward, image, flow, upstream)
    for actual, reference in zip(gradients(spatial.warp, image, flow, upstream), expected):
        np.testing.assert_allclose(actual, reference, atol=1e-5)
    # The backward ops also give the same without XLA.
    plain = sampling._trilinear_backward(tf.constant(image), tf.constant(upstream),
                                         *sampling._flow_cells(tf.constant(flow)))
    for actual, reference in zip(plain, expected):
        np.testing.assert_allclose(actual.numpy(), reference, atol=1e-5)


def test_warp_without_xla_matches_scipy(rng):
    """The forward ops run op by op (as after TFLite conversion) give the same result."""
    shape = (2, 9, 10, 8, 2)
    image = rng.random(shape).astype(np.float32)
    flow = edge_case_flow(rng, shape)
    np.testing.assert_allclose(sampling._trilinear_forward(image, flow).numpy(),
                               scipy_warp(image, flow), atol=1e-5)


def test_image_gradient_matches_finite_difference(rng):
    image = rng.random((1, 6, 6, 6, 1)).astype(np.float32)
    flow = (rng.standard_normal((1, 6, 6, 6, 3)) * 1.5).astype(np.float32)
    upstream = rng.standard_normal(image.shape).astype(np.float32)
    grad = gradients(spatial.warp, image, flow, upstream)[0]
    for index in [(0, 2, 3, 1, 0), (0, 5, 0, 2, 0), (0, 3, 3, 5, 0)]:
        up, down = image.copy(), image.copy()
        up[index] += 0.5
        down[index] -= 0.5
        numeric = np.sum(upstream * (spatial.warp(up, flow).numpy()
                                     - spatial.warp(down, flow).numpy()))
        assert abs(numeric - grad[index]) < 1e-4


@pytest.mark.parametrize("dtype", [tf.float64, tf.float16])
def test_warp_keeps_the_image_dtype(rng, dtype):
    image = rng.random((1, 6, 7, 5, 2))
    flow = (rng.standard_normal((1, 6, 7, 5, 3)) * 2).astype(np.float32)
    warped = spatial.warp(tf.constant(image, dtype), flow)
    assert warped.dtype == dtype
    tolerance = 1e-5 if dtype == tf.float64 else 2e-3
    np.testing.assert_allclose(warped.numpy(), scipy_warp(image, flow), atol=tolerance)


def test_graph_mode_with_unknown_batch(rng):
    shape = (8, 9, 7)
    signature = [tf.TensorSpec((None,) + shape + (2,)), tf.TensorSpec((None,) + shape + (3,))]
    forward = tf.function(spatial.warp, input_signature=signature)

    @tf.function(input_signature=signature)
    def backward(image, flow):
        with tf.GradientTape() as tape:
            tape.watch([image, flow])
            loss = tf.reduce_sum(spatial.warp(image, flow) ** 2)
        return tape.gradient(loss, [image, flow])

    for batch in (1, 3):
        image = rng.random((batch,) + shape + (2,)).astype(np.float32)
        flow = (rng.standard_normal((batch,) + shape + (3,)) * 3).astype(np.float32)
        np.testing.assert_allclose(forward(image, flow).numpy(), scipy_warp(image, flow),
                                   atol=1e-5)
        upstream = 2 * sampling._trilinear_forward(image, flow)
        expected = gradients(sampling._trilinear_forward, image, flow, upstream)
        for actual, reference in zip(backward(image, flow), expected):
            np.testing.assert_allclose(actual.numpy(), reference, atol=1e-5)


def test_tflite_builtins_match(rng):
    shape = (1, 16, 16, 16, 2)
    image = rng.random(shape).astype(np.float32)
    flow = (rng.standard_normal(shape[:4] + (3,)) * 4).astype(np.float32)
    function = tf.function(spatial.warp, input_signature=[
        tf.TensorSpec(shape), tf.TensorSpec(shape[:4] + (3,))]).get_concrete_function()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([function])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # tf.lite.Interpreter's deprecation notice
        interpreter = tf.lite.Interpreter(model_content=converter.convert())
    interpreter.allocate_tensors()
    for detail, value in zip(interpreter.get_input_details(), (image, flow)):
        interpreter.set_tensor(detail["index"], value)
    interpreter.invoke()
    warped = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    np.testing.assert_allclose(warped, scipy_warp(image, flow), atol=1e-5)


@pytest.mark.parametrize("bad_image, bad_flow, message", [
    ((8, 8, 8, 1), (1, 8, 8, 8, 3), "5-D"),
    ((1, 8, 8, 8, 1), (1, 8, 8, 8, 2), "3 channels"),
    ((1, 8, 8, 8, 1), (1, 8, 8, 6, 3), "spatial shape"),
])
def test_warp_rejects_bad_shapes(bad_image, bad_flow, message):
    with pytest.raises(ValueError, match=message):
        spatial.warp(np.zeros(bad_image, np.float32), np.zeros(bad_flow, np.float32))


def random_affine(rng, batch):
    matrix = (rng.standard_normal((batch, 3, 3)) * 0.1).astype(np.float32)
    translation = (rng.standard_normal((batch, 3)) * 2).astype(np.float32)
    return matrix, translation


def test_affine_flow_matches_numpy(rng):
    matrix, translation = random_affine(rng, 2)
    shape = (6, 7, 8)
    flow = spatial.affine_flow(matrix, translation, shape).numpy()
    for index in [(0, 0, 0), (5, 6, 7), (2, 3, 4)]:
        centred = np.array(index) - (np.array(shape) - 1) / 2
        for b in range(2):
            np.testing.assert_allclose(flow[(b,) + index],
                                       matrix[b] @ centred + translation[b], atol=1e-5)


def test_affine_jacobian_is_det_everywhere(rng):
    matrix, translation = random_affine(rng, 2)
    flow = spatial.affine_flow(matrix, translation, (10, 12, 9))
    determinant = spatial.jacobian_determinant(flow).numpy()
    expected = np.linalg.det(matrix + np.eye(3))
    for b in range(2):
        np.testing.assert_allclose(determinant[b], expected[b], rtol=1e-4)


def test_jacobian_matches_numpy_gradient(rng):
    flow = ndimage.gaussian_filter(rng.standard_normal((1, 12, 11, 10, 3)),
                                   sigma=(0, 2, 2, 2, 0)).astype(np.float32) * 5
    grads = np.stack([np.stack(np.gradient(flow[0, ..., c]), axis=-1) for c in range(3)],
                     axis=-2)                                   # [D, H, W, 3, 3]
    expected = np.linalg.det(grads + np.eye(3))
    np.testing.assert_allclose(spatial.jacobian_determinant(flow).numpy()[0], expected,
                               rtol=1e-4, atol=1e-4)


def smooth_flow(rng, shape, amplitude, sigma=3):
    field = ndimage.gaussian_filter(rng.standard_normal(shape),
                                    sigma=(0, sigma, sigma, sigma, 0))
    return (field / np.abs(field).max() * amplitude).astype(np.float32)


def test_composition_equals_warping_twice(rng):
    """Warping by compose(agg, flow) equals warp(warp(m, agg), flow) away from borders.

    Both sides interpolate (trilinear twice vs. once after composing), so they agree
    only up to interpolation error: on a smooth image with smooth 3-voxel flows, within
    1e-2 of the image range, and far closer than the naive sum of the two flows.
    """
    shape = (1, 24, 24, 24)
    z, y, x = np.meshgrid(*[np.arange(24)] * 3, indexing="ij")
    moving = 0.5 + 0.25 * np.sin(z / 4.0) + 0.25 * np.cos(y / 5.0 + x / 6.0)
    moving = moving.astype(np.float32)[None, ..., None]
    first = smooth_flow(rng, shape + (3,), 3.0, sigma=2)
    second = smooth_flow(rng, shape + (3,), 3.0, sigma=2)
    twice = spatial.warp(spatial.warp(moving, first), second).numpy()
    once = spatial.warp(moving, spatial.compose(first, second)).numpy()
    inner = (slice(None), slice(5, -5), slice(5, -5), slice(5, -5))
    naive = spatial.warp(moving, first + second).numpy()
    error = np.abs(twice[inner] - once[inner]).max()
    assert error < 1e-2
    assert error < 0.5 * np.abs(twice[inner] - naive[inner]).max()


def test_exact_affine_composition(rng):
    matrix, translation = random_affine(rng, 1)
    shape = (16, 16, 16)
    affine = spatial.affine_flow(matrix, translation, shape)
    flow = smooth_flow(rng, (1,) + shape + (3,), 1.5)
    exact = spatial.compose_affine(matrix, affine, flow).numpy()
    general = spatial.compose(affine, flow).numpy()
    # The general composition interpolates a linear field: exact except where clamped.
    inner = (slice(None), slice(3, -3), slice(3, -3), slice(3, -3))
    np.testing.assert_allclose(general[inner], exact[inner], atol=1e-4)


def test_affine_forms_match_numpy_with_gradients(rng):
    """The XLA-compiled affine flow and composition against numpy (values) and their
    gradients against the closed forms (d/dW of sum(u * (W c + t)) = sum_x u c^T)."""
    matrix, translation = random_affine(rng, 2)
    shape = (5, 6, 7)
    centred = np.stack(np.meshgrid(*[np.arange(n) - (n - 1) / 2 for n in shape],
                                   indexing="ij"), axis=-1)
    flow = rng.standard_normal((2, *shape, 3)).astype(np.float32)
    affine = rng.standard_normal((2, *shape, 3)).astype(np.float32)
    upstream = rng.standard_normal((2, *shape, 3)).astype(np.float32)
    matrix_t, flow_t = tf.constant(matrix), tf.constant(flow)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([matrix_t, flow_t])
        field = spatial.affine_flow(matrix_t, translation, shape)
        composed = spatial.compose_affine(matrix_t, affine, flow_t)
        loss_field = tf.reduce_sum(upstream * field)
        loss_composed = tf.reduce_sum(upstream * composed)
    np.testing.assert_allclose(field.numpy(), np.einsum("bij,dhwj->bdhwi", matrix, centred)
                               + translation[:, None, None, None], atol=1e-5)
    np.testing.assert_allclose(composed.numpy(), flow + affine
                               + np.einsum("bij,bdhwj->bdhwi", matrix, flow), atol=1e-5)
    np.testing.assert_allclose(tape.gradient(loss_field, matrix_t).numpy(),
                               np.einsum("bdhwi,dhwj->bij", upstream, centred), rtol=1e-4)
    np.testing.assert_allclose(tape.gradient(loss_composed, flow_t).numpy(),
                               upstream + np.einsum("bij,bdhwi->bdhwj", matrix, upstream),
                               atol=1e-5)


def test_upsample_matches_map_coordinates(rng):
    low = rng.random((2, 5, 6, 4, 2)).astype(np.float32)
    for factor in (2, 3):
        up = spatial.upsample(low, factor).numpy()
        assert up.shape == (2, 5 * factor, 6 * factor, 4 * factor, 2)
        axes = [(np.arange(n * factor) + 0.5) / factor - 0.5 for n in low.shape[1:4]]
        coords = np.stack(np.meshgrid(*axes, indexing="ij"))
        for b in range(2):
            for c in range(2):
                expected = ndimage.map_coordinates(low[b, ..., c], coords, order=1,
                                                   mode="nearest")
                np.testing.assert_allclose(up[b, ..., c], expected, atol=1e-5)


def test_downsample_is_block_mean(rng):
    volume = rng.random((1, 8, 6, 4, 3)).astype(np.float32)
    expected = volume.reshape(1, 4, 2, 3, 2, 2, 2, 3).mean(axis=(2, 4, 6))
    np.testing.assert_allclose(spatial.downsample(volume, 2).numpy(), expected, atol=1e-6)
    # The same inside a graph whose spatial sizes are unknown (the non-XLA path).
    unknown = tf.function(lambda v: spatial.downsample(v, 2),
                          input_signature=[tf.TensorSpec([None] * 4 + [3], tf.float32)])
    np.testing.assert_allclose(unknown(volume).numpy(), expected, atol=1e-6)
    with pytest.raises(ValueError, match="divisible"):
        spatial.downsample(np.zeros((1, 7, 8, 8, 1), np.float32), 2)


def test_upsample_flow_and_warp_is_the_two_steps(rng):
    """The fused inference step equals upsample_flow then warp (both outputs), and says
    which input does not fit."""
    image = rng.random((2, 12, 8, 16, 2)).astype(np.float32)
    low_flow = (rng.standard_normal((2, 6, 4, 8, 3)) * 1.5).astype(np.float32)
    flow, warped = spatial.upsample_flow_and_warp(image, low_flow, 2)
    expected_flow = spatial.upsample_flow(low_flow, 2)
    np.testing.assert_allclose(flow.numpy(), expected_flow.numpy(), atol=1e-5)
    np.testing.assert_allclose(warped.numpy(), spatial.warp(image, expected_flow).numpy(),
                               atol=1e-5)
    assert np.abs(warped.numpy() - image).max() > 0.1, "the flow moved nothing"
    with pytest.raises(ValueError, match="not 2 x low_flow"):
        spatial.upsample_flow_and_warp(image[:, :10], low_flow, 2)
    with pytest.raises(ValueError, match="low_flow"):
        spatial.upsample_flow_and_warp(image, low_flow[..., :2], 2)


def test_flow_resolution_round_trip_translation_and_affine(rng):
    """A known translation scales by the factor; an affine flow survives down- and
    upsampling exactly away from the clamped outer half-voxel."""
    flow = np.zeros((1, 8, 8, 8, 3), np.float32)
    flow[..., 0] = 1.5
    np.testing.assert_allclose(spatial.upsample_flow(flow, 2).numpy()[..., 0], 3.0,
                               atol=1e-6)
    np.testing.assert_allclose(spatial.downsample_flow(flow * 2, 2).numpy()[..., 0], 1.5,
                               atol=1e-6)
    matrix, translation = random_affine(rng, 1)
    full = spatial.affine_flow(matrix, translation, (16, 16, 16))
    round_trip = spatial.upsample_flow(spatial.downsample_flow(full, 2), 2).numpy()
    inner = (slice(None), slice(1, -1), slice(1, -1), slice(1, -1))
    np.testing.assert_allclose(round_trip[inner], full.numpy()[inner], atol=1e-4)


def test_invert_flow_round_trips_points(rng):
    # A smooth field of about 2 voxels; the check samples it with scipy, not spatial.warp.
    shape = (20, 18, 16)
    noise = rng.normal(size=(*shape, 3))
    field = np.stack([ndimage.gaussian_filter(noise[..., c], 3.0) for c in range(3)], -1)
    field *= 2.0 / np.abs(field).max()
    inverse = spatial.invert_flow(field[None].astype(np.float32)).numpy()[0]
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    x = grid + inverse                                   # x with x + field(x) = grid
    inside = np.all((x > 1) & (x < np.array(shape) - 2), axis=-1)
    moved = x + np.stack([ndimage.map_coordinates(field[..., c], x.reshape(-1, 3).T,
                                                  order=1, mode="nearest").reshape(shape)
                          for c in range(3)], -1)
    error = np.abs(moved - grid)[inside]
    assert inside.mean() > 0.5
    assert error.max() < 0.05
    # The un-inverted field is far from its own inverse: the check can fail.
    assert np.abs(field + inverse)[inside].max() > 0.1


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("points_shape", [(7,), (4, 5, 6)])
def test_sample_matches_scipy_at_points_and_on_another_grid(rng, points_shape, compiled):
    field = rng.normal(size=(2, 9, 10, 11, 3)).astype(np.float32)
    points = rng.uniform(-1, 11, (2, *points_shape, 3)).astype(np.float32)  # some clamped
    np.testing.assert_allclose(spatial.sample(field, points, compiled=compiled).numpy(),
                               scipy_sample(field, points), atol=1e-5)
    nearest = spatial.sample(field, points, mode="nearest").numpy()
    np.testing.assert_array_equal(nearest, scipy_sample(field, points, order=0))


def test_sample_on_the_flow_grid_is_warp(rng):
    image = rng.random((2, 8, 9, 7, 2)).astype(np.float32)
    flow = edge_case_flow(rng, image.shape)
    grid = spatial.voxel_grid(image.shape[1:4]).numpy()
    for mode in spatial.MODES:
        np.testing.assert_allclose(spatial.sample(image, grid + flow, mode).numpy(),
                                   spatial.warp(image, flow, mode).numpy(), atol=1e-6)


def test_warp_nearest_keeps_integer_labels(rng):
    labels = rng.choice([0, 3, 70000], (1, 12, 12, 12, 1)).astype(np.int32)
    flow = rng.normal(0, 2, (1, 12, 12, 12, 3)).astype(np.float32)
    nearest = spatial.warp(labels, flow, mode="nearest")
    assert nearest.dtype == tf.int32
    np.testing.assert_array_equal(nearest.numpy(), scipy_warp(labels, flow, order=0))


def test_warp_labels_rules(rng):
    labels = rng.choice([0, 3, 7], (1, 12, 12, 12, 1)).astype(np.float32)
    flow = (rng.normal(0, 1, (1, 12, 12, 12, 3))).astype(np.float32)
    nearest = spatial.warp_labels(labels, flow, "nearest").numpy()
    np.testing.assert_array_equal(nearest, scipy_warp(labels, flow, order=0))
    # threshold: each label's mask x 255 warped (the scipy reference) and kept above 128.
    threshold = spatial.warp_labels(labels, flow, "threshold").numpy()
    expected = np.zeros_like(labels)
    for value in (3, 7):
        warped_mask = scipy_warp((labels == value) * np.float32(255), flow)
        expected[warped_mask > 128] = value
    assert np.mean(threshold == expected) > 0.999            # float32 ties at 128 aside
    only_seven = spatial.warp_labels(labels, flow, "threshold", label_values=[7]).numpy()
    np.testing.assert_array_equal(only_seven, np.where(threshold == 7, 7, 0))
    # largest: the label (or background) whose warped mask is largest.
    largest = spatial.warp_labels(labels, flow, "largest", label_values=[3, 7]).numpy()
    masks = np.concatenate([scipy_warp((labels == v).astype(np.float32), flow)
                            for v in (0, 3, 7)], axis=-1)
    assert np.mean(largest[..., 0] == np.array([0, 3, 7])[masks.argmax(-1)]) > 0.999
    with pytest.raises(ValueError, match="rule: expected one of"):
        spatial.warp_labels(labels, flow, "majority")


def test_sample_labels_on_the_flow_grid_is_warp_labels(rng):
    labels = rng.choice([0, 1, 2], (1, 10, 10, 10, 1)).astype(np.uint8)
    flow = rng.normal(0, 1.5, (1, 10, 10, 10, 3)).astype(np.float32)
    grid = spatial.voxel_grid(labels.shape[1:4]).numpy()
    for rule in spatial.LABEL_RULES:
        values = [1, 2] if rule == "largest" else None
        warped = spatial.warp_labels(labels, flow, rule, values).numpy()
        assert warped.dtype == np.uint8
        np.testing.assert_array_equal(
            spatial.sample_labels(labels, grid + flow, rule, values).numpy(), warped)
