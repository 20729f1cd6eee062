"""Running a training job: data, model, trainer, schedules, checkpoints, validation.

``train.py`` and the demo both call :func:`train`; everything a run needs is in its
:class:`RunConfig`, saved beside the weights before the first step.
"""

from __future__ import annotations

import logging
import os
import sys

import keras
import numpy as np
import tensorflow as tf

from aldk_tf import metrics, runs
from aldk_tf.aldk import ALDKTrainer
from aldk_tf.checkpoints import CheckpointCallback, RunCheckpoint
from aldk_tf.config import RunConfig
from aldk_tf.critic import FlowCritic
from aldk_tf.crd import CrossResolutionDistiller
from aldk_tf.schedules import release_schedule
from aldk_tf.teacher_flows import (TeacherFlowStore, extract_teacher_flows, flows_path,
                                   missing_pairs)
from aldk_tf.training import RegistrationTrainer

log = logging.getLogger(__name__)

TRAINING_SCHEME = "1"
VALIDATION_SCHEME = "2"


def load_teacher(teacher_run: str, image_size):
    """The frozen teacher of ``teacher_run``; its image size must equal the student's."""
    teacher_config, teacher = runs.load_model(teacher_run)
    if tuple(teacher_config.model.image_size) != tuple(image_size):
        raise runs.RunError(
            f"{teacher_run}: teacher image size {tuple(teacher_config.model.image_size)} "
            f"differs from the student's {tuple(image_size)}")
    teacher.trainable = False
    return teacher


def ensure_teacher_flows(teacher_run: str, teacher, dataset_config, pairs,
                         batch_size: int = 1) -> str:
    """Extract whatever flows of ``pairs`` the teacher run does not have stored yet."""
    path = flows_path(teacher_run)
    todo = missing_pairs(path, pairs)
    if todo:
        print(f"extracting {len(todo)} teacher flows into {path}", file=sys.stderr)
        extract_teacher_flows(teacher, dataset_config, todo, path, batch_size)
    return path


def _with_teacher_flows(dataset: tf.data.Dataset, path: str, image_size):
    """Attach each pair's stored teacher flow (read by pair ids) to the batches."""
    store = TeacherFlowStore(path)

    def read(fixed_ids, moving_ids):
        return np.stack([store.read(f.decode(), m.decode())
                         for f, m in zip(fixed_ids.numpy(), moving_ids.numpy())])

    def attach(batch):
        flow = tf.py_function(read, [batch["fixed_id"], batch["moving_id"]], tf.float32)
        flow.set_shape([None, *image_size, 3])
        return {**batch, "teacher_flow": flow}

    return dataset.map(attach)


def training_dataset(config: RunConfig, dataset_config, start_step: int,
                     teacher_flows: str | None):
    """Infinite training batches, positioned at ``start_step`` for an exact resume.

    With stored teacher flows the pairs are not augmented: a stored flow belongs to the
    un-augmented pair (as in the release). Augmentation stays on for the teacher, the
    plain student, and ALDK with the teacher run online (``--teacher-online``).
    """
    from aldk_tf.data import pair_dataset
    augment = config.train.augment and teacher_flows is None
    dataset = pair_dataset(dataset_config, TRAINING_SCHEME, config.train.batch,
                           shuffle=True, seed=config.train.seed, augment=augment,
                           repeat=True, with_ids=True, drop_remainder=True)
    if teacher_flows is not None:
        dataset = _with_teacher_flows(dataset, teacher_flows, config.model.image_size)
    dataset = dataset.map(lambda batch: {key: value for key, value in batch.items()
                                         if not key.endswith("_id")})
    if start_step:
        # Replays the pipeline (reading and augmenting, no network) so a resumed run sees
        # exactly the batches an uninterrupted one would.
        dataset = dataset.skip(start_step)
    return dataset


class ValidationDice(keras.callbacks.Callback):
    """Mean Dice on the first pairs of the validation scheme every ``every`` steps."""

    def __init__(self, network, dataset_config, step_variable, every: int, max_pairs: int,
                 log_dir: str | None = None):
        super().__init__()
        from aldk_tf.data import list_pairs, load_pair
        self.network, self.every, self.step_variable = network, max(int(every), 1), \
            step_variable
        self.label_values = dataset_config.label_values
        pairs = list_pairs(dataset_config, VALIDATION_SCHEME)[:max_pairs]
        self.pairs = [load_pair(dataset_config, f, m) for f, m in pairs]
        self.writer = tf.summary.create_file_writer(log_dir) if log_dir else None
        self.history: list[tuple[int, float]] = []

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.step_variable.numpy())
        if step % self.every == 0:
            self.history.append((step, self.evaluate()))
            print(f"\nstep {step}: validation Dice {self.history[-1][1]:.4f}",
                  file=sys.stderr)
            if self.writer is not None:
                with self.writer.as_default():
                    tf.summary.scalar("validation/dice", self.history[-1][1], step=step)

    def evaluate(self) -> float:
        scores = []
        for pair in self.pairs:
            inputs = {k: pair[k][None] for k in ("fixed", "moving")}
            flow = self.network(inputs, training=False)["flow"]
            result = metrics.pair_metrics(pair["fixed_seg"][None], pair["moving_seg"][None],
                                          flow, self.label_values)
            scores.append(result["dice"][0])
        return float(np.nanmean(scores)) if scores else float("nan")


def _validation_scheme_exists(dataset_config) -> bool:
    return VALIDATION_SCHEME in dataset_config.schemes


def train(config: RunConfig, run_dir: str, verbose: int | str = "auto",
          max_steps: int | None = None) -> dict:
    """Train (or resume) the run in ``run_dir``; returns the Keras history dict.

    ``max_steps`` stops early at that global step (used by tests and to split work).
    """
    from aldk_tf.data import list_pairs, load_dataset_config
    keras.utils.set_random_seed(config.train.seed)
    dataset_config = load_dataset_config(config.dataset)
    if tuple(dataset_config.image_size) != tuple(config.model.image_size):
        raise runs.RunError(
            f"{config.dataset}: image_size {tuple(dataset_config.image_size)} differs "
            f"from the model's {tuple(config.model.image_size)}")
    teacher = None
    for name, part in (("--aldk", config.aldk), ("--crd", config.crd)):
        if part.enabled and not part.teacher:
            raise runs.RunError(f"{name} needs --teacher weights/<teacher run>")
    teacher_run = config.aldk.teacher if config.aldk.enabled else config.crd.teacher
    if config.aldk.enabled or config.crd.enabled:
        teacher = load_teacher(teacher_run, config.model.image_size)
    os.makedirs(run_dir, exist_ok=True)
    config.save(run_dir)

    network = config.model.build()
    total_steps = config.train.round * config.train.epochs
    use_aldk = config.aldk.enabled
    schedule = release_schedule(config.train.schedule, config.train.lr, config.train.round,
                                total_steps, cosine=(config.model.role == "student"
                                                     and not use_aldk))
    optimizer = keras.optimizers.Adam(schedule)
    distiller = None
    if config.crd.enabled:
        # The distiller runs the teacher on every batch, so ALDK uses those flows too.
        distiller = CrossResolutionDistiller(teacher, network, config.crd.flow_weight,
                                             config.crd.feature_weight, config.crd.levels)
    online = config.aldk.teacher_online or distiller is not None
    critic = critic_optimizer = flows = None
    if use_aldk:
        if not online:
            flows = ensure_teacher_flows(config.aldk.teacher, teacher, dataset_config,
                                         list_pairs(dataset_config, TRAINING_SCHEME))
        critic = FlowCritic(config.model.image_size)
        critic_optimizer = keras.optimizers.Adam(config.aldk.critic_lr)
        trainer = ALDKTrainer(network, critic, config.losses, config.aldk,
                              teacher=teacher if online else None, distiller=distiller)
        trainer.compile(g_optimizer=optimizer, d_optimizer=critic_optimizer)
    else:
        trainer = RegistrationTrainer(network, config.losses, distiller=distiller)
        trainer.compile(optimizer=optimizer)
        optimizer.build(trainer.trainable_weights_to_update())

    checkpoint = RunCheckpoint(run_dir, network, optimizer, critic, critic_optimizer,
                               extra={"adapters": distiller.adapters} if distiller else None)
    start = checkpoint.restore()
    end = total_steps if max_steps is None else min(total_steps, max_steps)
    if start >= end:
        print(f"{run_dir}: already at step {start} of {end}; nothing to train",
              file=sys.stderr)
        return {}

    log_dir = os.path.join(run_dir, runs.LOG_DIR)
    callbacks = [CheckpointCallback(checkpoint, config.train.checkpoint_every, run_dir,
                                    network),
                 keras.callbacks.TensorBoard(log_dir, update_freq=50)]
    validation = None
    if _validation_scheme_exists(dataset_config) and config.train.validate_every > 0:
        validation = ValidationDice(network, dataset_config, optimizer.iterations,
                                    config.train.validate_every,
                                    config.train.validation_pairs, log_dir)
        callbacks.append(validation)

    iterator = iter(training_dataset(config, dataset_config, start, flows))

    def batches():                     # one stream shared by every fit call below
        while True:
            yield (next(iterator),)

    stream = batches()
    history: dict[str, list] = {}
    epoch, step = start // config.train.round, start
    while step < end:
        # One Keras epoch per release epoch ("round" steps); a resumed or capped run
        # does only the part of the epoch that is left.
        steps = min((epoch + 1) * config.train.round, end) - step
        result = trainer.fit(stream, epochs=epoch + 1, initial_epoch=epoch,
                             steps_per_epoch=steps, callbacks=callbacks, verbose=verbose,
                             shuffle=False)
        for key, values in result.history.items():
            history.setdefault(key, []).extend(values)
        step += steps
        epoch += 1
    if validation is not None:
        history["validation_dice"] = validation.history
    return history
