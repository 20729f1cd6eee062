import numpy as np
import pytest
import tensorflow as tf

from aldk_tf import losses
from aldk_tf.config import LossWeights
from aldk_tf.networks import build_student


def test_similarity_is_one_minus_pearson(rng):
    a = rng.random((3, 8, 8, 8, 1)).astype(np.float32)
    b = (a * 0.5 + rng.random(a.shape) * 0.5).astype(np.float32)
    expected = [1 - np.corrcoef(a[i].ravel(), b[i].ravel())[0, 1] for i in range(3)]
    # The 1e-6 inside the square root shifts the value by ~1e-4 at these variances.
    np.testing.assert_allclose(losses.similarity_loss(a, b).numpy(), expected, atol=3e-4)
    cov = [np.cov(a[i].ravel(), b[i].ravel(), bias=True) for i in range(3)]
    with_eps = [1 - c[0, 1] / np.sqrt(c[0, 0] * c[1, 1] + 1e-6) for c in cov]
    np.testing.assert_allclose(losses.similarity_loss(a, b).numpy(), with_eps, atol=1e-5)
    np.testing.assert_allclose(losses.similarity_loss(a, a).numpy(), 0.0, atol=1e-4)


def test_smoothness_matches_numpy(rng):
    flow = rng.standard_normal((2, 6, 7, 8, 3)).astype(np.float32)
    expected = sum(0.5 * (np.diff(flow, axis=a) ** 2).sum(axis=(1, 2, 3, 4))
                   for a in (1, 2, 3)) / (6 * 7 * 8 * 3)
    np.testing.assert_allclose(losses.smoothness_loss(flow).numpy(), expected, rtol=1e-5)
    assert losses.smoothness_loss(np.ones_like(flow)).numpy().max() == 0


def test_det_and_ortho_vanish_on_rotations_only():
    angle = 0.3
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle),
                         np.cos(angle), 0], [0, 0, 1]], np.float32)
    scaling = np.diag([1.2, 0.9, 1.0]).astype(np.float32)
    w = np.stack([rotation - np.eye(3), scaling - np.eye(3)]).astype(np.float32)
    det = losses.det_loss(w).numpy()
    ortho = losses.ortho_loss(w).numpy()
    assert det[0] < 1e-8 and abs(ortho[0]) < 1e-3
    np.testing.assert_allclose(det[1], 0.5 * (1.08 - 1) ** 2, rtol=1e-4)
    # Independent: eigenvalues of C = A^T A + eps I.
    c = scaling.T @ scaling + 1e-5 * np.eye(3)
    lam = np.linalg.eigvalsh(c)
    s1, s2, s3 = lam.sum(), lam[0] * lam[1] + lam[0] * lam[2] + lam[1] * lam[2], lam.prod()
    expected = s1 + (1 + 1e-5) ** 2 * s2 / s3 - 6 * (1 + 1e-5)
    np.testing.assert_allclose(ortho[1], expected, rtol=1e-4)


def test_registration_losses_terms(rng):
    model = build_student((16, 16, 16), n_cascades=2)
    fixed = rng.random((2, 16, 16, 16, 1)).astype(np.float32)
    outputs = model({"fixed": fixed, "moving": fixed[::-1]})
    terms = losses.registration_losses(outputs, fixed, LossWeights())
    assert set(terms) == {"similarity", "smoothness", "det", "ortho", "total"}
    for value in terms.values():
        assert value.shape == (2,) and np.all(np.isfinite(value))
    expected_smooth = (losses.smoothness_loss(outputs["cascade_flow_1"])
                       + losses.smoothness_loss(outputs["cascade_flow_2"]))
    np.testing.assert_allclose(terms["smoothness"], expected_smooth, rtol=1e-5)


def test_gradient_penalty_zero_for_unit_norm_linear_critic(rng):
    """A linear critic with a unit-norm weight has gradient norm 1 everywhere."""
    weight = rng.standard_normal((4, 4, 4, 3)).astype(np.float32)
    weight /= np.linalg.norm(weight)

    def critic(flow, training=False):
        return tf.reduce_sum(flow * weight, axis=[1, 2, 3, 4])[:, None]

    real = rng.standard_normal((2, 4, 4, 4, 3)).astype(np.float32)
    fake = rng.standard_normal((2, 4, 4, 4, 3)).astype(np.float32)
    alpha = tf.constant(rng.random((2, 1, 1, 1, 1)), tf.float32)
    np.testing.assert_allclose(losses.gradient_penalty(critic, real, fake, alpha), 0.0,
                               atol=1e-6)

    def steep(flow, training=False):
        return 3.0 * critic(flow)

    np.testing.assert_allclose(losses.gradient_penalty(steep, real, fake, alpha), 4.0,
                               rtol=1e-5)


@pytest.mark.parametrize("beta", [0.0, 0.1, 1.0])
def test_distillation_loss_zero_when_flows_match(rng, beta):
    weight = rng.standard_normal((4, 4, 4, 3)).astype(np.float32)
    weight /= np.linalg.norm(weight)

    def critic(flow, training=False):
        return tf.reduce_sum(flow * weight, axis=[1, 2, 3, 4])[:, None]

    flow = rng.standard_normal((2, 4, 4, 4, 3)).astype(np.float32)
    np.testing.assert_allclose(losses.distillation_loss(critic, flow, flow, beta, 0.1),
                               0.0, atol=1e-6)
    other = flow + 1.0
    assert np.all(losses.distillation_loss(critic, flow, other, beta, 0.1).numpy() > 0)


def test_smoothness_gradient_matches_numpy(rng):
    """The hand-written (compiled) gradient: d/df of sum_b u_b * loss_b, where loss_b is
    0.5 * sum of squared forward differences / (D H W 3), computed with numpy."""
    flow = rng.standard_normal((2, 5, 6, 7, 3)).astype(np.float32)
    upstream = np.array([0.7, -1.3], np.float32)
    variable = tf.Variable(flow)
    with tf.GradientTape() as tape:
        value = tf.reduce_sum(losses.smoothness_loss(variable) * upstream)
    gradient = tape.gradient(value, variable).numpy()
    expected = np.zeros_like(flow)
    for axis in (1, 2, 3):
        difference = np.diff(flow, axis=axis)
        pad_before, pad_after = [(0, 0)] * 5, [(0, 0)] * 5
        pad_before[axis], pad_after[axis] = (1, 0), (0, 1)
        expected += np.pad(difference, pad_before) - np.pad(difference, pad_after)
    expected *= upstream[:, None, None, None, None] / flow[0].size
    np.testing.assert_allclose(gradient, expected, rtol=1e-5, atol=1e-8)


def test_det3_matches_numpy_and_has_a_gradient_at_singular_matrices(rng):
    matrices = rng.normal(size=(5, 3, 3)).astype(np.float32)
    np.testing.assert_allclose(losses.det3(tf.constant(matrices)).numpy(),
                               np.linalg.det(matrices), rtol=1e-4, atol=1e-5)
    singular = tf.Variable(np.array([[[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [0.0, 1.0, 1.0]]],
                                    np.float32) - np.eye(3, dtype=np.float32))
    with tf.GradientTape() as tape:
        value = losses.det_loss(singular)
    gradient = tape.gradient(value, singular)
    assert np.all(np.isfinite(gradient.numpy())) and np.abs(gradient.numpy()).max() > 0


def test_soft_dice_loss_matches_numpy_dice_and_skips_absent_labels(rng):
    labels = rng.integers(0, 4, (2, 6, 6, 6))
    labels[1][labels[1] == 3] = 2                   # pair 1 has no label 3 in either map
    other = np.where(rng.random(labels.shape) < 0.3, rng.integers(0, 3, labels.shape),
                     labels)
    fixed = np.eye(4, dtype=np.float32)[labels]
    warped = np.eye(4, dtype=np.float32)[other]
    expected = []
    for i in range(2):
        scores = [2 * np.sum((labels[i] == k) & (other[i] == k))
                  / (np.sum(labels[i] == k) + np.sum(other[i] == k))
                  for k in (1, 2, 3) if np.any(labels[i] == k) or np.any(other[i] == k)]
        expected.append(1 - np.mean(scores))
    assert len(expected) == 2
    np.testing.assert_allclose(losses.soft_dice_loss(fixed, warped).numpy(), expected,
                               rtol=1e-5)
    np.testing.assert_allclose(losses.soft_dice_loss(fixed, fixed).numpy(), 0.0, atol=1e-6)
    # Maps without their background channel score the same with background=False.
    np.testing.assert_allclose(losses.soft_dice_loss(fixed[..., 1:], warped[..., 1:],
                                                     background=False).numpy(),
                               expected, rtol=1e-5)


def test_label_term_gradient_moves_the_flow_towards_overlap():
    """The label term through the warp: its gradient w.r.t. a uniform shift points back
    towards alignment, and agrees with a finite difference."""
    from aldk_tf.config import LossWeights
    from aldk_tf.training.trainer import add_label_loss
    grid = np.arange(16, dtype=np.float32)
    ball = (np.linalg.norm(np.stack(np.meshgrid(grid, grid, grid, indexing="ij"), -1)
                           - 7.5, axis=-1) < 5).astype(np.float32)
    fixed = np.stack([1 - ball, ball], -1)[None]
    moving = np.roll(fixed, 2, axis=1)              # the ball 2 voxels further along axis 0
    shift = tf.Variable(0.5)

    def loss():
        flow = tf.stack([tf.fill([1, 16, 16, 16], shift), tf.zeros([1, 16, 16, 16]),
                         tf.zeros([1, 16, 16, 16])], -1)
        terms = add_label_loss({"total": tf.zeros([1])}, LossWeights(label=1.0).label,
                               {"fixed_labels": fixed, "moving_labels": moving},
                               {"flow": flow})
        return terms["label"][0]

    with tf.GradientTape() as tape:
        value = loss()
    gradient = float(tape.gradient(value, shift))
    assert gradient < 0                  # increasing the shift (towards 2) lowers the loss
    step = 1e-2
    shift.assign(0.5 + step)
    plus = float(loss())
    shift.assign(0.5 - step)
    minus = float(loss())
    np.testing.assert_allclose(gradient, (plus - minus) / (2 * step), rtol=0.05)
