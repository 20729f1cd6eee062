"""Cross-resolution distillation (CRD): a low-resolution student guided by the
full-resolution teacher.

What we built (the seed gives the idea, not the code):

* **Flow distillation** on the student's grid: the teacher's final flow, block-averaged
  to the low resolution and divided by the factor, against the student's low-resolution
  aggregate flow (mean squared difference, low-resolution voxels). Comparing where the
  student computes leaves out the upsampling error it cannot remove, and costs 1/f^3 of
  a full-resolution comparison.
* **Feature distillation through a feature-shifted teacher.** A stride-2^k feature of the
  full-resolution teacher lies on the same voxel grid as the stride-2^(k - log2 f) feature
  of the low-resolution student, so the teacher's encoder pyramid is *shifted* by
  ``log2 f`` levels to line up with the student's. At each aligned level the student's
  features are *fused* into the teacher's channel space by a learned 1x1x1 adapter and
  pulled towards the (frozen) teacher features, normalised by their mean square.
  Both sides are the first deformable cascade, fed as in the cascade (fixed image and
  the moving image after each model's own affine stage).

The frozen teacher runs on every batch (so augmentation stays on); only the student runs
at inference, and the adapters are dropped with the trainer.

Options, for a teacher that is not better than the student everywhere (the demo's
600-step teacher is *worse* than a plain student): ``gate="teacher_better"`` keeps a
pair's terms only when the teacher's warp has the lower similarity loss than the
student's; ``anneal_steps`` decays both weights linearly to 0. Both are off by default
(the seed's method). A factor of 1 gives the same terms on a full-resolution student
(no shift, no down-sampling): the control that isolates what the resolution costs.
"""

from __future__ import annotations

import math

import keras
import tensorflow as tf

from aldk_tf import spatial
from aldk_tf.losses import similarity_loss
from aldk_tf.networks.vtn import VTN_ENCODER

GATES = ("teacher_better", "always")

# Teacher (VTN) features at strides 2, 4, 8, 16, 32, 64 and the student's at 2..16.
TEACHER_LEVELS = ("conv1", "conv2", "conv3_1", "conv4_1", "conv5_1", "conv6_1")
STUDENT_LEVELS = ("conv1", "conv2", "conv3", "conv4")


def _feature_model(network, names) -> keras.Model:
    outputs = [network.get_layer(f"{network.name}_{name}").output for name in names]
    return keras.Model(network.input, outputs, name=f"{network.name}_features")


def _cascade_input(model_outputs, fixed, moving):
    """(fixed, moving after the model's affine stage) as the first cascade saw it."""
    if "affine_flow" in model_outputs:
        moving = spatial.warp(moving, model_outputs["affine_flow"])
    return tf.concat([fixed, moving], axis=-1)


class CrossResolutionDistiller:
    """Flow and feature distillation terms for a cross-resolution student.

    ``targets = distiller.teacher_targets(batch)`` (frozen teacher, once per step), then
    ``distiller.terms(batch, student_outputs, targets)`` gives per-sample, weighted
    ``crd_flow`` and ``crd_feature``, plus ``crd_weight`` (the per-pair factor applied to
    both: gate x anneal; reported, not a loss). The 1x1x1 adapters
    (``adapter_variables``) are trained with the student's optimizer and checkpointed
    with it.
    """

    def __init__(self, teacher, student, flow_weight: float = 0.1,
                 feature_weight: float = 0.05, levels: int = 3,
                 gate: str = "always", anneal_steps: int = 0):
        factor = student.resolution_factor
        shift = int(round(math.log2(factor)))
        if factor < 1 or 2 ** shift != factor:
            raise ValueError(f"cross-resolution distillation needs a student with a "
                             f"power-of-2 resolution_factor, got {factor}")
        if tuple(teacher.image_size) != tuple(student.image_size):
            raise ValueError(f"teacher image size {tuple(teacher.image_size)} differs from "
                             f"the student's {tuple(student.image_size)}")
        if gate not in GATES:
            raise ValueError(f"cross-resolution distillation: gate must be one of {GATES}, "
                             f"got {gate!r}")
        if int(anneal_steps) < 0:
            raise ValueError(f"cross-resolution distillation: anneal_steps must be >= 0, "
                             f"got {anneal_steps}")
        self.teacher, self.factor, self.gate = teacher, factor, gate
        self.anneal_steps = int(anneal_steps)
        self.flow_weight, self.feature_weight = float(flow_weight), float(feature_weight)
        count = min(levels, len(STUDENT_LEVELS), len(TEACHER_LEVELS) - shift)
        pairs = [(STUDENT_LEVELS[i], TEACHER_LEVELS[i + shift]) for i in range(count)]
        teacher_net, student_net = teacher.get_layer("cascade_1"), student.get_layer(
            "cascade_1")
        self.teacher_features = _feature_model(teacher_net, [t for _, t in pairs])
        self.student_features = _feature_model(student_net, [s for s, _ in pairs])
        teacher_channels = {name: teacher_net.channels * multiple
                            for name, multiple, _ in VTN_ENCODER}
        self.adapters = []
        for (student_name, teacher_name), feature in zip(
                pairs, _as_list(self.student_features.output)):
            adapter = keras.layers.Conv3D(teacher_channels[teacher_name], 1,
                                          name=f"fst_adapter_{student_name}")
            adapter.build(feature.shape)
            self.adapters.append(adapter)

    @property
    def adapter_variables(self):
        return [v for adapter in self.adapters for v in adapter.trainable_variables]

    def schedule(self, step) -> tf.Tensor:
        """Weight factor of the distillation terms at training ``step``: 1, or with
        ``anneal_steps`` a linear decay from 1 at step 0 to 0 at ``anneal_steps``."""
        if not self.anneal_steps or step is None:
            return tf.constant(1.0)
        progress = tf.cast(step, tf.float32) / float(self.anneal_steps)
        return tf.maximum(0.0, 1.0 - progress)

    def teacher_targets(self, batch, step=None):
        """The teacher's final flow, its shifted feature pyramid, its similarity loss per
        pair (no gradient) and the :meth:`schedule` factor at ``step``."""
        inputs = {"fixed": batch["fixed"], "moving": batch["moving"]}
        outputs = self.teacher(inputs, training=False)
        features = self.teacher_features(
            _cascade_input(outputs, batch["fixed"], batch["moving"]), training=False)
        similarity = similarity_loss(batch["fixed"], outputs["warped"])
        return (tf.stop_gradient(outputs["flow"]),
                [tf.stop_gradient(f) for f in _as_list(features)],
                tf.stop_gradient(similarity), self.schedule(step))

    def weights(self, batch, student_outputs, teacher_similarity) -> tf.Tensor:
        """Per-pair weight of the distillation terms, ``[B]``: with the
        ``teacher_better`` gate, 1 where the teacher's warp matches the fixed image
        better than the student's (lower similarity loss), else 0; always 1 otherwise."""
        if self.gate == "always":
            return tf.ones_like(teacher_similarity)
        student_similarity = tf.stop_gradient(
            similarity_loss(batch["fixed"], student_outputs["warped"]))
        return tf.cast(teacher_similarity < student_similarity, tf.float32)

    def terms(self, batch, student_outputs, targets) -> dict:
        target_flow, target_features, teacher_similarity, scale = targets
        gate = self.weights(batch, student_outputs, teacher_similarity) * scale
        low_target = spatial.downsample_flow(target_flow, self.factor)
        # Factor 1 (the same terms at full resolution, the control run): no "low_flow".
        student_flow = student_outputs.get("low_flow", student_outputs["flow"])
        difference = student_flow - low_target
        flow_term = tf.reduce_mean(tf.square(difference), axis=[1, 2, 3, 4])

        fixed_low = spatial.downsample(batch["fixed"], self.factor)
        moving_low = spatial.downsample(batch["moving"], self.factor)
        features = _as_list(self.student_features(
            _cascade_input(student_outputs, fixed_low, moving_low), training=True))
        feature_term = 0.0
        for adapter, student_feature, teacher_feature in zip(self.adapters, features,
                                                             target_features):
            norm = tf.reduce_mean(tf.square(teacher_feature), axis=[1, 2, 3, 4]) + 1e-6
            error = tf.reduce_mean(tf.square(adapter(student_feature) - teacher_feature),
                                   axis=[1, 2, 3, 4])
            feature_term += error / norm
        feature_term = feature_term / len(self.adapters)
        return {"crd_flow": self.flow_weight * gate * flow_term,
                "crd_feature": self.feature_weight * gate * feature_term,
                "crd_weight": tf.stop_gradient(gate)}


def _as_list(value):
    return list(value) if isinstance(value, (list, tuple)) else [value]
