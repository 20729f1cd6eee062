"""Loss functions. Each returns one value per sample (``[B]``); callers reduce.

Similarity and regularisers follow the RCN/VTN release; the WGAN-GP pieces follow the
ALDK paper and Gulrajani et al.
"""

from __future__ import annotations

import tensorflow as tf

from aldk_tf.compiled import xla
from aldk_tf.spatial.checks import slice_along

PEARSON_EPS = 1e-6
ORTHO_EPS = 1e-5


def _per_sample(tensor: tf.Tensor) -> tf.Tensor:
    return tf.reshape(tensor, [tf.shape(tensor)[0], -1])


def similarity_loss(fixed_image: tf.Tensor, warped_image: tf.Tensor) -> tf.Tensor:
    """``1 - Pearson correlation`` over the whole volume of each pair, ``[B]``."""
    fixed = _per_sample(tf.cast(fixed_image, tf.float32))
    warped = _per_sample(tf.cast(warped_image, tf.float32))
    fixed = fixed - tf.reduce_mean(fixed, axis=1, keepdims=True)
    warped = warped - tf.reduce_mean(warped, axis=1, keepdims=True)
    covariance = tf.reduce_mean(fixed * warped, axis=1)
    fixed_var = tf.reduce_mean(fixed * fixed, axis=1)
    warped_var = tf.reduce_mean(warped * warped, axis=1)
    return 1.0 - covariance / tf.sqrt(fixed_var * warped_var + PEARSON_EPS)


DICE_EPS = 1e-5


def soft_dice_loss(fixed_labels: tf.Tensor, warped_labels: tf.Tensor,
                   background: bool = True) -> tf.Tensor:
    """``1 - mean soft Dice`` of one-hot (or soft) label maps ``[B, D, H, W, C]``, ``[B]``.

    Channel 0 (background) is left out (``background=False``: the maps have no background
    channel, every channel counts), and so is every channel that is empty in both maps of
    a pair (a label that pair does not have). A pair with no such label scores 0.
    """
    first = 1 if background else 0
    fixed = tf.cast(fixed_labels, tf.float32)[..., first:]
    warped = tf.cast(warped_labels, tf.float32)[..., first:]
    overlap = tf.reduce_sum(fixed * warped, axis=[1, 2, 3])              # [B, C - 1]
    volume = tf.reduce_sum(fixed + warped, axis=[1, 2, 3])
    present = tf.cast(volume > DICE_EPS, tf.float32)
    dice = 2.0 * overlap / tf.maximum(volume, DICE_EPS)
    count = tf.reduce_sum(present, axis=1)
    return tf.where(count > 0, 1.0 - tf.reduce_sum(dice * present, 1)
                    / tf.maximum(count, 1.0), 0.0)


def smoothness_loss(flow: tf.Tensor) -> tf.Tensor:
    """Sum over the 3 axes of ``0.5 * sum(forward difference ** 2) / (D H W 3)``, ``[B]``."""
    return _smoothness_with_gradient(tf.cast(flow, tf.float32))


@tf.custom_gradient
def _smoothness_with_gradient(flow: tf.Tensor):
    # Compiled forward and hand-written compiled gradient: TensorFlow's own kernels for
    # the gradient of these differences (StridedSliceGrad for slices; segment sums and
    # transposes for gathers) took several times the rest of an instance-optimisation
    # step on a 128^3 flow; under XLA each pass is one elementwise loop.
    def gradient(upstream):
        return _smoothness_gradient_xla(flow, upstream)
    return _smoothness_xla(tf.stop_gradient(flow)), gradient


def _smoothness(flow: tf.Tensor) -> tf.Tensor:
    total = 0.0
    for axis in (1, 2, 3):
        difference = (slice_along(flow, axis, 1, None) - slice_along(flow, axis, 0, -1))
        total += 0.5 * tf.reduce_sum(_per_sample(difference) ** 2, axis=1)
    voxels = tf.cast(tf.reduce_prod(tf.shape(flow)[1:]), tf.float32)   # D * H * W * 3
    return total / voxels


def _smoothness_gradient(flow: tf.Tensor, upstream: tf.Tensor) -> tf.Tensor:
    """d(upstream . smoothness) / d flow: per axis, the difference ending at each voxel
    minus the one starting there (zero beyond the ends), over the voxel count."""
    gradient = 0.0
    for axis in (1, 2, 3):
        difference = slice_along(flow, axis, 1, None) - slice_along(flow, axis, 0, -1)
        before = [[0, 0]] * 5
        after = [[0, 0]] * 5
        before[axis], after[axis] = [1, 0], [0, 1]
        gradient += tf.pad(difference, before) - tf.pad(difference, after)
    voxels = tf.cast(tf.reduce_prod(tf.shape(flow)[1:]), tf.float32)
    return gradient * tf.reshape(upstream, [-1, 1, 1, 1, 1]) / voxels


_smoothness_xla = xla(_smoothness)
_smoothness_gradient_xla = xla(_smoothness_gradient)


def det3(matrix: tf.Tensor) -> tf.Tensor:
    """Determinants of ``[B, 3, 3]`` matrices by cofactor expansion, ``[B]``.

    Unlike ``tf.linalg.det`` its gradient is a polynomial: it needs no matrix inverse,
    so one step that makes a matrix singular does not abort training.
    """
    m = matrix
    return (m[:, 0, 0] * (m[:, 1, 1] * m[:, 2, 2] - m[:, 1, 2] * m[:, 2, 1])
            - m[:, 0, 1] * (m[:, 1, 0] * m[:, 2, 2] - m[:, 1, 2] * m[:, 2, 0])
            + m[:, 0, 2] * (m[:, 1, 0] * m[:, 2, 1] - m[:, 1, 1] * m[:, 2, 0]))


def det_loss(matrix: tf.Tensor) -> tf.Tensor:
    """``0.5 * (det(I + W) - 1) ** 2``, ``[B]``."""
    affine = tf.cast(matrix, tf.float32) + tf.eye(3)
    return 0.5 * (det3(affine) - 1.0) ** 2


def ortho_loss(matrix: tf.Tensor) -> tf.Tensor:
    """Deviation of ``A = I + W`` from orthogonality, ``[B]``.

    With ``C = A^T A + eps I`` and ``s1, s2, s3`` the elementary symmetric polynomials of
    C's eigenvalues (trace, sum of principal 2x2 minors, det):
    ``s1 + (1 + eps)^2 s2 / s3 - 6 (1 + eps)``; zero for a rotation.
    """
    affine = tf.cast(matrix, tf.float32) + tf.eye(3)
    c = tf.matmul(affine, affine, transpose_a=True) + ORTHO_EPS * tf.eye(3)
    s1 = tf.linalg.trace(c)
    s2 = (c[:, 0, 0] * c[:, 1, 1] - c[:, 0, 1] * c[:, 1, 0]
          + c[:, 0, 0] * c[:, 2, 2] - c[:, 0, 2] * c[:, 2, 0]
          + c[:, 1, 1] * c[:, 2, 2] - c[:, 1, 2] * c[:, 2, 1])
    s3 = det3(c)
    return s1 + (1.0 + ORTHO_EPS) ** 2 * s2 / s3 - 6.0 * (1.0 + ORTHO_EPS)


def registration_losses(outputs: dict, fixed_image: tf.Tensor, weights) -> dict:
    """The RCN unsupervised loss terms of a :class:`RecursiveCascade`'s outputs.

    Similarity on the final warped image only; smoothness on every deformable cascade's
    own flow; det/ortho on the affine stage. ``weights`` has ``similarity``,
    ``smoothness``, ``det`` and ``ortho``. Returns per-sample terms (``[B]`` each, already
    weighted) and their sum under ``"total"``.
    """
    terms = {"similarity": weights.similarity * similarity_loss(fixed_image,
                                                                outputs["warped"])}
    flows = sorted(key for key in outputs if key.startswith("cascade_flow_"))
    terms["smoothness"] = weights.smoothness * tf.add_n(
        [smoothness_loss(outputs[key]) for key in flows])
    if "matrix" in outputs:
        terms["det"] = weights.det * det_loss(outputs["matrix"])
        terms["ortho"] = weights.ortho * ortho_loss(outputs["matrix"])
    terms["total"] = tf.add_n(list(terms.values()))
    return terms


def gradient_penalty(critic, real_flow: tf.Tensor, fake_flow: tf.Tensor,
                     alpha: tf.Tensor) -> tf.Tensor:
    """``(||grad critic(x_hat)||_2 - 1)^2`` at ``x_hat = alpha real + (1 - alpha) fake``.

    ``alpha`` broadcasts as ``[B, 1, 1, 1, 1]`` (a scalar gives the same point for every
    sample); the norm is over all non-batch axes. Returns ``[B]``.
    """
    real_flow = tf.convert_to_tensor(real_flow, tf.float32)
    fake_flow = tf.convert_to_tensor(fake_flow, tf.float32)
    interpolate = alpha * real_flow + (1.0 - alpha) * fake_flow
    with tf.GradientTape() as tape:
        tape.watch(interpolate)
        score = critic(interpolate, training=True)
    gradient = tape.gradient(score, interpolate)
    norm = tf.sqrt(tf.reduce_sum(_per_sample(gradient) ** 2, axis=1) + 1e-12)
    return (norm - 1.0) ** 2


def critic_loss(critic, teacher_flow, student_flow, alpha, penalty_weight):
    """WGAN-GP critic objective per sample: ``D(student) - D(teacher) + lambda GP``."""
    student_score = tf.reshape(critic(student_flow, training=True), [-1])
    teacher_score = tf.reshape(critic(teacher_flow, training=True), [-1])
    penalty = gradient_penalty(critic, teacher_flow, student_flow, alpha)
    return student_score - teacher_score + penalty_weight * penalty, penalty


def distillation_loss(critic, teacher_flow, student_flow, beta, penalty_weight):
    """ALDK's ``l_dis`` per sample: ``||D(s) - D(t)||^2 + lambda (||grad D(phi_hat)|| - 1)^2``.

    ``phi_hat = beta * teacher + (1 - beta) * student``; gradients reach the student
    through both terms, the critic is only evaluated here.
    """
    student_score = tf.reshape(critic(student_flow, training=False), [-1])
    teacher_score = tf.reshape(critic(teacher_flow, training=False), [-1])
    penalty = gradient_penalty(critic, teacher_flow, student_flow, beta)
    return (student_score - teacher_score) ** 2 + penalty_weight * penalty
