"""ALDK: adversarial learning with distilled knowledge (the ALDK paper, parts 2 and 3).

One Keras model holds the student, the critic and (optionally) the frozen teacher; its
``train_step`` makes, on the schedule of Algorithm 1,

* a student update with ``gamma * l_rec + (1 - gamma) * l_dis`` on adversarial steps and
  ``l_rec`` alone otherwise, where ``l_rec`` is the unsupervised RCN objective and
  ``l_dis = ||D(phi_s) - D(phi_t)||^2 + lambda (||grad D(phi_hat)|| - 1)^2`` with
  ``phi_hat = beta phi_t + (1 - beta) phi_s``;
* a critic update (its own optimizer) with the WGAN-GP objective
  ``mean D(phi_s) - mean D(phi_t) + lambda GP``, interpolates uniform per sample.

Step ``s`` (0-based, the student optimizer's iteration count, so it is checkpointed and a
resumed run continues on the same schedule) is adversarial when ``s % period == 0`` and
``s < until``; the critic is updated when ``s % critic_period == 0`` and ``s < until``.
Under ``fit`` the schedule is decided on the host before each step and every case gets its
own traced step, so no optimizer update sits inside a ``tf.cond`` (a cross-replica
synchronisation in a conditional branch is not allowed under a ``tf.distribute``
strategy); a ``train_step`` called directly branches with ``tf.cond`` on the step.

Losses are averaged over the global batch (``global_batch_size``), so the all-reduced
gradients of several replicas equal those of one device. The interpolation weights of the
critic's gradient penalty are uniform per sample and a function of ``(seed, step, index
of the sample in the global batch)``: any split of a batch across replicas draws the
same ones.

The teacher flow comes from the batch (``teacher_flow``, stored once by the extraction
step) or, when the batch has none, from the frozen teacher run on that very batch (exact
for augmented pairs, at the cost of a teacher forward pass per step).
"""

from __future__ import annotations

import tensorflow as tf

from aldk_tf import spatial
from aldk_tf.losses import critic_loss, distillation_loss, registration_losses
from aldk_tf.training.trainer import (BuiltTrainer, add_distillation, add_flow_distillation,
                                      add_label_loss,
                                      average_over_batch, network_inputs, online_target,
                                      replica_mean,
                                      unpack)

ALDK_METRICS = ("loss", "rec", "dis", "critic", "gp", "adversarial")


class ALDKTrainer(BuiltTrainer):
    """``compile(g_optimizer=..., d_optimizer=...)``, then ``fit``."""

    def __init__(self, student, critic, loss_weights, aldk, teacher=None,
                 global_batch_size=None, distiller=None, seed: int = 0, **kwargs):
        super().__init__(ALDK_METRICS, distiller, aldk.flow_weight, loss_weights.label,
                         **kwargs)
        self.seed = int(seed)
        self.host_schedule = None         # (adversarial, critic_update) of the step ``fit``
                                          # runs next, set on the host (see module doc)
        self.student, self.critic, self.teacher = student, critic, teacher
        if teacher is not None:
            teacher.trainable = False
        self.loss_weights, self.aldk = loss_weights, aldk
        self.global_batch_size = global_batch_size

    def compile(self, g_optimizer, d_optimizer, **kwargs):
        super().compile(**kwargs)
        self.g_optimizer, self.d_optimizer = g_optimizer, d_optimizer
        # Built up front so the conditional updates never create variables in a branch.
        g_optimizer.build(self.student_variables())
        d_optimizer.build(self.critic.trainable_variables)

    def student_variables(self):
        return self.student.trainable_variables + self.distiller_variables()

    @property
    def step(self):
        return self.g_optimizer.iterations

    def call(self, inputs, training=False):
        return self.student(network_inputs(inputs), training=training)

    def schedule(self, step):
        """``(adversarial, critic_update)`` for a 0-based step (Python bools for an int,
        boolean tensors for a tensor)."""
        before_cut = step < self.aldk.adversarial_until
        adversarial = before_cut & (step % self.aldk.adversarial_period == 0)
        critic_update = before_cut & (step % self.aldk.critic_period == 0)
        return adversarial, critic_update

    def make_train_function(self, force=False):
        """Keras' train function, traced once per schedule case and picked on the host."""
        if self.train_function is not None and not force:
            return self.train_function
        if self.steps_per_execution != 1:
            raise ValueError("ALDKTrainer schedules each step on the host; compile it "
                             "with steps_per_execution=1")
        traced = {}
        make = super().make_train_function

        def train_function(iterator):
            self.host_schedule = self.schedule(int(self.step.numpy()))
            try:                      # (a case is traced on its first call, in here)
                if self.host_schedule not in traced:
                    make(force=True)                    # sets self.train_function
                    traced[self.host_schedule] = self.train_function
                    self.train_function = train_function
                return traced[self.host_schedule](iterator)
            finally:
                self.host_schedule = None

        self.train_function = train_function
        return train_function

    def teacher_flow(self, batch):
        if "teacher_flow" in batch:
            return tf.cast(batch["teacher_flow"], tf.float32)
        if self.teacher is None:
            raise ValueError("ALDK batch has no 'teacher_flow' and no teacher model was "
                             "given")
        return online_target(self.teacher, batch, self.aldk.refine)

    def _alpha(self, batch_size, step):
        """Uniform ``[B, 1, 1, 1, 1]`` weights for this replica's samples: the slice of a
        draw over the global batch seeded by ``(seed, step)``."""
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        context = tf.distribute.get_replica_context()
        replica = context.replica_id_in_sync_group if context is not None else 0
        global_batch = self.global_batch_size or batch_size * replicas
        seed = tf.stack([tf.constant(self.seed, tf.int64), tf.cast(step, tf.int64)])
        alpha = tf.random.stateless_uniform([global_batch], seed=seed)
        first = tf.cast(replica, tf.int32) * batch_size
        return tf.reshape(alpha[first:first + batch_size], [-1, 1, 1, 1, 1])

    def critic_view(self, batch, flow, warped=None):
        """What the critic judges of a flow: the flow itself, or with ``critic_input``
        "images" the fixed image beside the moving image warped by it ``[B, D, H, W, 2]``
        (``warped``: that warped image when already computed)."""
        if self.aldk.critic_input == "flow":
            return flow
        if warped is None:
            warped = spatial.warp(tf.cast(batch["moving"], tf.float32), flow)
        return tf.concat([tf.cast(batch["fixed"], tf.float32),
                          tf.cast(warped, tf.float32)], axis=-1)

    def student_update(self, batch, teacher_flow, adversarial, targets=None):
        """One student step; returns its outputs, loss terms, ``l_rec``, ``l_dis``, loss.

        ``targets`` are the cross-resolution distiller's teacher targets, if any; their
        terms join ``l_rec``.
        """
        aldk = self.aldk
        gamma = tf.where(adversarial, aldk.gamma, 1.0)
        with tf.GradientTape() as tape:
            outputs = self.student(network_inputs(batch), training=True)
            terms = registration_losses(outputs, batch["fixed"], self.loss_weights)
            terms = add_label_loss(terms, self.loss_weights.label, batch, outputs)
            terms = add_distillation(terms, self.distiller, batch, outputs, targets)
            terms = add_flow_distillation(terms, aldk.flow_weight, teacher_flow, outputs,
                                          batch["moving"], aldk.flow_target,
                                          batch["fixed"])
            rec = average_over_batch(terms["total"], self.global_batch_size)
            dis = _branch(
                adversarial,
                lambda: average_over_batch(
                    distillation_loss(self.critic,
                                      tf.stop_gradient(self.critic_view(batch, teacher_flow)),
                                      self.critic_view(batch, outputs["flow"],
                                                       outputs["warped"]),
                                      aldk.beta, aldk.lamb), self.global_batch_size),
                lambda: tf.constant(0.0))
            loss = gamma * rec + (1.0 - gamma) * dis
        variables = self.student_variables()
        self.g_optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return outputs, terms, rec, dis, loss

    def critic_update(self, teacher_flow, student_flow, step=None):
        """One WGAN-GP critic step at ``step`` (default: the current one) on what the
        critic judges of the two flows (:meth:`critic_view`); returns ``(objective, mean
        gradient penalty)``."""
        student_flow = tf.stop_gradient(student_flow)
        alpha = self._alpha(tf.shape(student_flow)[0], self.step if step is None else step)
        with tf.GradientTape() as tape:
            per_sample, penalty = critic_loss(self.critic, teacher_flow, student_flow,
                                              alpha, self.aldk.lamb)
            objective = average_over_batch(per_sample, self.global_batch_size)
        variables = self.critic.trainable_variables
        self.d_optimizer.apply_gradients(zip(tape.gradient(objective, variables),
                                             variables))
        return objective, tf.reduce_mean(penalty)

    def train_step(self, data):
        batch = unpack(data)
        step = tf.cast(self.step, tf.int64)
        if self.host_schedule is None:
            adversarial, critic_update = self.schedule(step)
        else:                         # known while tracing: plain branches, no tf.cond
            adversarial, critic_update = (tf.constant(flag) for flag in self.host_schedule)
        targets = None
        if self.distiller is not None:
            targets = self.distiller.teacher_targets(batch, step)
            teacher_flow = targets[0]                            # [B, D, H, W, 3]
        else:
            teacher_flow = self.teacher_flow(batch)
        outputs, terms, rec, dis, loss = self.student_update(batch, teacher_flow,
                                                             adversarial, targets)
        # The critic judges the flow the student produced in this step.
        critic_value, penalty = _branch(
            critic_update,
            lambda: self.critic_update(self.critic_view(batch, teacher_flow),
                                       self.critic_view(batch, outputs["flow"],
                                                        outputs["warped"]), step),
            lambda: (tf.constant(0.0), tf.constant(0.0)))

        # Trackers see per-replica means; Keras averages them over replicas.
        loss, rec, dis, critic_value = (replica_mean(value)
                                        for value in (loss, rec, dis, critic_value))
        adversarial = tf.cast(adversarial, tf.float32)
        critic_update = tf.cast(critic_update, tf.float32)
        values = {"loss": loss, "rec": rec, "adversarial": adversarial, "dis": dis,
                  "critic": critic_value, "gp": penalty}
        # Adversarial-only quantities are averaged over the steps where they exist.
        return self.record(values, terms, {"dis": adversarial, "critic": critic_update,
                                           "gp": critic_update})


def _branch(condition, true_fn, false_fn):
    """``tf.cond``, or just the taken branch when ``condition`` is known while tracing."""
    known = tf.get_static_value(condition)
    if known is not None:
        return true_fn() if known else false_fn()
    return tf.cond(condition, true_fn, false_fn)
