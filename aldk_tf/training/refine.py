"""Instance optimisation: refine a registration flow per pair by gradient steps.

Starting from a network's flow (or zeros), ``steps`` Adam updates of a dense increment on
the unsupervised objective of each pair::

    similarity * (1 - NCC(fixed, warp(moving, initial_flow + increment)))
        + smoothness * smoothness_loss(increment)

The smoothness term sees only the increment, so whatever the network already predicted
(an affine component included) is not pulled back towards zero. Losses are summed over
the batch and Adam is elementwise, so every pair of a batch is refined independently.

The loop runs in one ``tf.function`` (a ``tf.while_loop``, traced once per input shape;
the step count and the weights are tensors, so changing them does not retrace). Adam's
state is carried through the loop rather than held in a ``tf.Variable``: a call has no
state left over from the previous one, and a new batch size or grid needs no new
variables. Used by the teacher-flow extraction (:mod:`aldk_tf.training.teacher_flows`),
``evaluate.py --refine`` and ``python -m aldk_tf.cli.register --refine``.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from aldk_tf import losses, spatial
from aldk_tf.compiled import xla
# The flags and the default step size (voxels: roughly the largest move of a voxel's flow
# per step, Adam's update being ~learning_rate * sign(gradient) early on) live where the
# command lines read them without TensorFlow.
from aldk_tf.refine_options import (DEFAULT_LEARNING_RATE, add_arguments,  # noqa: F401
                                    check_arguments)

#: Default number of Adam steps.
DEFAULT_STEPS = 50

ADAM_BETA_1 = 0.9
ADAM_BETA_2 = 0.999
#: Adam's epsilon, relative to the gradient of the objective *summed* over voxels (see
#: :func:`_refine`); far below the gradients of any voxel that sees an image edge.
ADAM_EPSILON = 1e-8


def refine_flow(fixed_image, moving_image, initial_flow, steps: int = DEFAULT_STEPS, *,
                learning_rate: float = DEFAULT_LEARNING_RATE, smoothness: float = 1.0,
                similarity: float = 1.0) -> tuple[tf.Tensor, dict]:
    """Refine ``initial_flow`` by ``steps`` Adam steps on each pair's objective.

    Args:
      fixed_image: ``[B, D, H, W, 1]`` intensities (any float dtype; computed in float32).
      moving_image: ``[B, D, H, W, 1]``.
      initial_flow: ``[B, D, H, W, 3]`` voxel flow to start from (e.g. a network's).
      steps: number of Adam steps, ``>= 0``; 0 returns ``initial_flow`` unchanged.
      learning_rate: Adam's step size in voxels.
      smoothness: weight of :func:`aldk_tf.losses.smoothness_loss` of the increment.
      similarity: weight of :func:`aldk_tf.losses.similarity_loss` (1 - Pearson).
    Returns:
      ``(flow, info)``: the refined ``[B, D, H, W, 3]`` float32 flow, and
      ``{"initial_loss": [B], "final_loss": [B]}`` (the objective before and after).
    Raises:
      ValueError: inputs of the wrong rank, channel count or grid, non-finite values, a
        negative step count or a non-positive learning rate.
    """
    fixed_image = tf.convert_to_tensor(fixed_image)
    moving_image = tf.convert_to_tensor(moving_image)
    initial_flow = tf.convert_to_tensor(initial_flow)
    _check_inputs(fixed_image, moving_image, initial_flow, steps, learning_rate,
                  smoothness, similarity)
    flow, initial_loss, final_loss = _refine(
        tf.cast(fixed_image, tf.float32), tf.cast(moving_image, tf.float32),
        tf.cast(initial_flow, tf.float32), tf.constant(int(steps), tf.int32),
        tf.constant(learning_rate, tf.float32), tf.constant(similarity, tf.float32),
        tf.constant(smoothness, tf.float32))
    return flow, {"initial_loss": initial_loss, "final_loss": final_loss}


def _check_inputs(fixed_image, moving_image, initial_flow, steps, learning_rate,
                  smoothness, similarity) -> None:
    for name, tensor, channels in (("fixed_image", fixed_image, 1),
                                   ("moving_image", moving_image, 1),
                                   ("initial_flow", initial_flow, 3)):
        shape = tensor.shape
        if shape.rank != 5 or shape[-1] != channels:
            raise ValueError(f"{name}: expected shape [B, D, H, W, {channels}], "
                             f"got {shape}")
        if not tensor.dtype.is_floating:
            raise ValueError(f"{name}: expected a float tensor, got {tensor.dtype.name}")
    if moving_image.shape != fixed_image.shape:
        raise ValueError(f"moving_image: expected the fixed image's shape "
                         f"{fixed_image.shape}, got {moving_image.shape}")
    if initial_flow.shape[:4] != fixed_image.shape[:4]:
        raise ValueError(f"initial_flow: expected shape {fixed_image.shape[:4] + [3]}, "
                         f"got {initial_flow.shape}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 0:
        raise ValueError(f"steps: expected an integer >= 0, got {steps!r}")
    if not np.isfinite(learning_rate) or learning_rate <= 0:
        raise ValueError(f"learning_rate: expected a finite value > 0, got {learning_rate}")
    for name, weight in (("smoothness", smoothness), ("similarity", similarity)):
        if not np.isfinite(weight) or weight < 0:
            raise ValueError(f"{name}: expected a finite weight >= 0, got {weight}")
    if tf.executing_eagerly():
        for name, tensor in (("fixed_image", fixed_image), ("moving_image", moving_image),
                             ("initial_flow", initial_flow)):
            if not bool(tf.reduce_all(tf.math.is_finite(tensor))):
                raise ValueError(f"{name}: contains NaN or infinite values")


def objective(fixed_image, moving_image, initial_flow, increment, similarity=1.0,
              smoothness=1.0) -> tf.Tensor:
    """The refined objective per pair, ``[B]`` (float32 inputs, already validated)."""
    warped = spatial.warp(moving_image, initial_flow + increment)
    return (similarity * losses.similarity_loss(fixed_image, warped)
            + smoothness * losses.smoothness_loss(increment))


@tf.function(reduce_retracing=True, autograph=False)    # an explicit tf.while_loop
def _refine(fixed_image, moving_image, initial_flow, steps, learning_rate, similarity,
            smoothness):
    """:func:`refine_flow` on validated float32 tensors; ``(flow, initial, final loss)``.

    Gradients are taken of the objective summed over the batch and multiplied by the
    voxel count (the losses are means over voxels): the scale Adam normalises away,
    except relative to its epsilon, which this puts at a per-voxel level.
    """
    voxels = tf.cast(tf.reduce_prod(tf.shape(fixed_image)[1:4]), tf.float32)

    def loss_of(increment):
        return objective(fixed_image, moving_image, initial_flow, increment, similarity,
                         smoothness)

    def body(step, increment, first_moment, second_moment):
        with tf.GradientTape() as tape:
            tape.watch(increment)
            total = tf.reduce_sum(loss_of(increment)) * voxels
        gradient = tape.gradient(total, increment)          # [B, D, H, W, 3]
        step += 1
        increment, first_moment, second_moment = _adam_xla(
            increment, first_moment, second_moment, gradient, step, learning_rate)
        return step, increment, first_moment, second_moment

    zeros = tf.zeros_like(initial_flow)
    initial_loss = loss_of(zeros)
    _, increment, _, _ = tf.while_loop(
        lambda step, *_: step < steps, body, (tf.constant(0), zeros, zeros, zeros))
    return initial_flow + increment, initial_loss, loss_of(increment)


def _adam(increment, first_moment, second_moment, gradient, step, learning_rate):
    """One Adam update (step counted from 1): ``(increment, first, second moment)``."""
    first_moment = ADAM_BETA_1 * first_moment + (1.0 - ADAM_BETA_1) * gradient
    second_moment = ADAM_BETA_2 * second_moment + (1.0 - ADAM_BETA_2) * tf.square(gradient)
    t = tf.cast(step, tf.float32)
    first_unbiased = first_moment / (1.0 - ADAM_BETA_1 ** t)
    second_unbiased = second_moment / (1.0 - ADAM_BETA_2 ** t)
    increment = increment - learning_rate * first_unbiased / (tf.sqrt(second_unbiased)
                                                              + ADAM_EPSILON)
    return increment, first_moment, second_moment


# One elementwise loop under XLA instead of a dozen passes over [B, D, H, W, 3] arrays.
_adam_xla = xla(_adam)
