"""Unsupervised training of a registration network (the teacher, or a plain student)."""

from __future__ import annotations

import keras
import tensorflow as tf

from aldk_tf import spatial
from aldk_tf.losses import registration_losses, similarity_loss, soft_dice_loss

LOSS_TERMS = ("similarity", "smoothness", "det", "ortho", "label", "flow_distill",
              "crd_flow", "crd_feature", "crd_weight")
# Distillation terms that join the loss (``crd_weight`` is only reported: the per-pair
# weight of the distillation terms, i.e. the gate's open fraction times the anneal).
DISTILLATION_LOSSES = ("crd_flow", "crd_feature")


def average_over_batch(per_sample: tf.Tensor, global_batch_size=None) -> tf.Tensor:
    """Mean over the global batch (correct under a tf.distribute strategy)."""
    return tf.nn.compute_average_loss(per_sample, global_batch_size=global_batch_size)


def replica_mean(loss: tf.Tensor) -> tf.Tensor:
    """A loss from :func:`average_over_batch` as the mean over this replica's samples.

    That is what a ``keras.metrics.Mean`` tracker should see: Keras averages trackers over
    replicas, so they report the global-batch mean (= ``loss`` on a single device).
    """
    return loss * tf.cast(tf.distribute.get_strategy().num_replicas_in_sync, loss.dtype)


def network_inputs(batch: dict) -> dict:
    return {"fixed": batch["fixed"], "moving": batch["moving"]}


def tracked_terms(distiller, flow_weight: float = 0.0,
                  label_weight: float = 0.0) -> tuple[str, ...]:
    """The loss terms a trainer reports (the distillation and label ones only when
    used)."""
    return tuple(t for t in LOSS_TERMS
                 if (distiller is not None or not t.startswith("crd"))
                 and (flow_weight > 0 or t != "flow_distill")
                 and (label_weight > 0 or t != "label"))


def add_label_loss(terms: dict, weight: float, batch: dict, outputs: dict) -> dict:
    """Add ``weight`` times the soft Dice loss of the moving labels warped by the
    network's flow against the fixed labels (:func:`soft_dice_loss`); nothing when
    ``weight`` is 0."""
    if not weight:
        return terms
    if "moving_labels" not in batch or "fixed_labels" not in batch:
        raise ValueError("the label term needs labelled pairs ('fixed_labels', "
                         "'moving_labels' one-hot maps), as the pair generator gives")
    # The background channel is left out before the warp: one channel less to warp, and
    # no slice of the warped maps to differentiate (its gradient is a full-size copy).
    warped = spatial.warp(tf.cast(batch["moving_labels"][..., 1:], tf.float32),
                          tf.cast(outputs["flow"], tf.float32))
    term = weight * soft_dice_loss(batch["fixed_labels"][..., 1:], warped, background=False)
    return {**terms, "label": term, "total": terms["total"] + term}


def flow_distillation_loss(student_flow: tf.Tensor, teacher_flow: tf.Tensor) -> tf.Tensor:
    """Mean squared difference of two flows over voxels and components, ``[B]``."""
    difference = tf.cast(student_flow, tf.float32) - tf.cast(teacher_flow, tf.float32)
    return tf.reduce_mean(tf.reshape(difference ** 2, [tf.shape(difference)[0], -1]), 1)


FLOW_TARGETS = ("flow", "warped", "warped_gated")


def warped_distillation_loss(moving: tf.Tensor, teacher_flow: tf.Tensor,
                             student_warped: tf.Tensor) -> tf.Tensor:
    """The similarity loss between the student's warped moving image and the moving image
    warped by the teacher's flow, ``[B]``.

    Unlike the flow difference it asks nothing where the images cannot tell flows apart
    (background, homogeneous tissue): there the teacher's flow is one arbitrary choice of
    many, and matching it voxel by voxel spends the student's capacity on that choice.
    The target is reachable by a deformation, unlike the fixed image itself.
    """
    return similarity_loss(teacher_warped(moving, teacher_flow), student_warped)


def teacher_warped(moving: tf.Tensor, teacher_flow: tf.Tensor) -> tf.Tensor:
    """The moving image warped by the teacher's flow, float32, without gradient: the
    image-level terms' target."""
    return tf.stop_gradient(spatial.warp(tf.cast(moving, tf.float32),
                                         tf.cast(teacher_flow, tf.float32)))


def gated_warped_distillation_loss(fixed: tf.Tensor, moving: tf.Tensor,
                                   teacher_flow: tf.Tensor,
                                   student_warped: tf.Tensor) -> tf.Tensor:
    """:func:`warped_distillation_loss` on the pairs where the teacher's warped image is
    closer to the fixed image (similarity loss) than the student's, 0 on the others,
    ``[B]``: the student is never pulled towards a teacher that aligns a pair worse than
    it does itself. The gate carries no gradient."""
    fixed = tf.cast(fixed, tf.float32)
    student_warped = tf.cast(student_warped, tf.float32)
    target = teacher_warped(moving, teacher_flow)
    gate = tf.stop_gradient(tf.cast(
        similarity_loss(fixed, target) < similarity_loss(fixed, student_warped),
        tf.float32))
    return gate * similarity_loss(target, student_warped)


def online_target(teacher, batch: dict, refine: int = 0) -> tf.Tensor:
    """The teacher's flow for ``batch`` (no gradient), refined by ``refine`` steps of
    instance optimisation per pair when ``refine`` > 0 (:mod:`aldk_tf.training.refine`,
    its default step size): the refined targets of stored flows, made on every generated
    batch."""
    flow = tf.stop_gradient(teacher(network_inputs(batch), training=False)["flow"])
    if refine:
        from aldk_tf.training.refine import refine_flow
        flow, _ = refine_flow(tf.cast(batch["fixed"], tf.float32),
                              tf.cast(batch["moving"], tf.float32),
                              tf.cast(flow, tf.float32), int(refine))
        flow = tf.stop_gradient(flow)
    return flow


def add_flow_distillation(terms: dict, weight: float, teacher_flow, outputs,
                          moving=None, target: str = "flow", fixed=None) -> dict:
    """Add ``weight`` times the plain distillation term (no critic) to ``terms`` and its
    total; nothing when ``weight`` is 0. ``target`` "flow": the mean squared flow
    difference; "warped": :func:`warped_distillation_loss` (needs ``moving``);
    "warped_gated": :func:`gated_warped_distillation_loss` (needs ``moving`` and
    ``fixed``)."""
    if not weight:
        return terms
    if teacher_flow is None:
        raise ValueError("flow distillation needs a 'teacher_flow' in the batch")
    if target == "warped":
        term = weight * warped_distillation_loss(moving, teacher_flow, outputs["warped"])
    elif target == "warped_gated":
        term = weight * gated_warped_distillation_loss(fixed, moving, teacher_flow,
                                                       outputs["warped"])
    elif target == "flow":
        term = weight * flow_distillation_loss(outputs["flow"], teacher_flow)
    else:
        raise ValueError(f"flow distillation target: expected one of {FLOW_TARGETS}, got "
                         f"{target!r}")
    return {**terms, "flow_distill": term, "total": terms["total"] + term}


def add_distillation(terms: dict, distiller, batch, outputs, targets) -> dict:
    """Add the cross-resolution distillation terms (if any) to ``terms`` and its total."""
    if distiller is None:
        return terms
    extra = distiller.terms(batch, outputs, targets)
    losses = [extra[name] for name in DISTILLATION_LOSSES]
    return {**terms, **extra, "total": terms["total"] + tf.add_n(losses)}


def unpack(data) -> dict:
    """The batch dict of a Keras data element (``batch`` or ``(batch,)``)."""
    return keras.utils.unpack_x_y_sample_weight(data)[0]


class BuiltTrainer(keras.Model):
    """The trainers' base: one ``keras.metrics.Mean`` tracker per logged quantity, and
    networks, optimizers and trackers that exist before ``fit``.

    ``metric_names`` are the trainer's own quantities (logged first, in that order); the
    loss terms of :func:`tracked_terms` follow. Under a strategy Keras would otherwise
    pull one batch before training and all-reduce it to build the model symbolically
    (which fails for a dict batch under ``MultiWorkerMirroredStrategy``); these trainers
    have nothing left to build.
    """

    def __init__(self, metric_names, distiller=None, flow_weight: float = 0.0,
                 label_weight: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.distiller = distiller
        self.loss_terms = tracked_terms(distiller, flow_weight, label_weight)
        self.trackers = {name: keras.metrics.Mean(name=name)
                         for name in (*metric_names, *self.loss_terms)}

    @property
    def metrics(self):
        return list(self.trackers.values())

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        return None

    def distiller_variables(self) -> list:
        """The distiller's trained variables (its adapters), trained with the network."""
        return self.distiller.adapter_variables if self.distiller is not None else []

    def record(self, values: dict, terms: dict, sample_weights: dict | None = None) -> dict:
        """Add this step's ``values`` and the batch mean of each tracked loss term in
        ``terms`` to the trackers (weighted by ``sample_weights[name]`` where given, so a
        quantity that exists only on some steps averages over those); the step's logs."""
        values = {**values, **{name: tf.reduce_mean(terms[name])
                               for name in self.loss_terms if name in terms}}
        weights = sample_weights or {}
        for name, value in values.items():
            self.trackers[name].update_state(value, sample_weight=weights.get(name))
        return self.step_logs({name: tracker.result()
                               for name, tracker in self.trackers.items()})

    @staticmethod
    def step_logs(values: dict) -> dict:
        """A train step's logs. Under ``MultiWorkerMirroredStrategy`` Keras averages them
        over replicas with ``strategy.reduce("MEAN", axis=0)``, which needs rank-1 values
        (scalars fail: tensorflow/tensorflow#72388)."""
        if isinstance(tf.distribute.get_strategy(),
                      tf.distribute.MultiWorkerMirroredStrategy):
            return {name: tf.reshape(value, [1]) for name, value in values.items()}
        return values


class RegistrationTrainer(BuiltTrainer):
    """Wraps a :class:`RecursiveCascade` with the RCN unsupervised objective.

    ``compile(optimizer=...)`` then ``fit`` on batches of ``{"fixed", "moving", ...}``.
    The loss is similarity on the final warp + smoothness on every deformable cascade
    + det/ortho on the affine stage (see :func:`registration_losses`).
    """

    def __init__(self, network, loss_weights, global_batch_size=None, distiller=None,
                 flow_weight: float = 0.0, flow_target: str = "flow", teacher=None,
                 refine: int = 0, **kwargs):
        super().__init__(("loss",), distiller, flow_weight, loss_weights.label, **kwargs)
        self.flow_target = flow_target
        self.teacher = teacher            # run per batch when the batch has no teacher_flow
        self.refine = int(refine)         # its flow refined by this many steps
        self.network = network
        self.loss_weights = loss_weights
        self.global_batch_size = global_batch_size
        self.flow_weight = float(flow_weight)

    def call(self, inputs, training=False):
        return self.network(network_inputs(inputs), training=training)

    def train_step(self, data):
        batch = unpack(data)
        targets = (self.distiller.teacher_targets(batch, self.optimizer.iterations)
                   if self.distiller is not None else None)
        teacher_flow = batch.get("teacher_flow")
        if teacher_flow is None and self.teacher is not None and self.flow_weight:
            teacher_flow = online_target(self.teacher, batch, self.refine)
        with tf.GradientTape() as tape:
            outputs = self.network(network_inputs(batch), training=True)
            terms = registration_losses(outputs, batch["fixed"], self.loss_weights)
            terms = add_label_loss(terms, self.loss_weights.label, batch, outputs)
            terms = add_distillation(terms, self.distiller, batch, outputs, targets)
            terms = add_flow_distillation(terms, self.flow_weight, teacher_flow, outputs,
                                          batch["moving"], self.flow_target,
                                          batch["fixed"])
            loss = average_over_batch(terms["total"], self.global_batch_size)
        variables = self.trainable_weights_to_update()
        self.optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return self.record({"loss": replica_mean(loss)}, terms)

    def trainable_weights_to_update(self):
        return self.network.trainable_variables + self.distiller_variables()

