"""Learning-rate schedules of the original releases, as Keras schedules on the step."""

from __future__ import annotations

import math

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="aldk_tf")
class EpochStepDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Per epoch: ``lr, lr, lr, lr/2, lr/4, lr/8, ...`` (teacher, ALDK student)."""

    def __init__(self, base_lr: float, steps_per_epoch: int, flat_epochs: int = 3):
        self.base_lr, self.steps_per_epoch = float(base_lr), int(steps_per_epoch)
        self.flat_epochs = int(flat_epochs)

    def __call__(self, step):
        epoch = tf.cast(step, tf.float32) // float(self.steps_per_epoch)
        halvings = tf.maximum(epoch - (self.flat_epochs - 1), 0.0)
        return self.base_lr * tf.pow(0.5, halvings)

    def get_config(self):
        return {"base_lr": self.base_lr, "steps_per_epoch": self.steps_per_epoch,
                "flat_epochs": self.flat_epochs}


@keras.saving.register_keras_serializable(package="aldk_tf")
class EpochCosineDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Student without ALDK: per epoch ``lr, lr/8, lr/16, lr/32, ...`` times a cosine
    annealing with ``cycles`` restarts spread evenly over the whole run."""

    def __init__(self, base_lr: float, steps_per_epoch: int, total_steps: int,
                 cycles: int = 5):
        self.base_lr, self.steps_per_epoch = float(base_lr), int(steps_per_epoch)
        self.total_steps, self.cycles = int(total_steps), int(cycles)

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        epoch = step // float(self.steps_per_epoch)
        epoch_factor = tf.where(epoch < 1.0, 1.0, tf.pow(0.5, epoch + 2.0))
        cycle = max(self.total_steps / self.cycles, 1.0)
        phase = tf.math.floormod(step, cycle) / cycle
        return self.base_lr * epoch_factor * 0.5 * (1.0 + tf.cos(math.pi * phase))

    def get_config(self):
        return {"base_lr": self.base_lr, "steps_per_epoch": self.steps_per_epoch,
                "total_steps": self.total_steps, "cycles": self.cycles}


def release_schedule(kind: str, base_lr: float, steps_per_epoch: int, total_steps: int,
                     cosine: bool):
    """The schedule for ``kind`` ("auto", "step", "cosine" or "constant").

    "auto": the cosine form for every student (``cosine=True``), the step form for a
    teacher. (The release gave only the student *without* ALDK the cosine form, so its
    ALDK rows differed from their control in the schedule too; here distilled and plain
    students share one schedule.)
    """
    if kind == "auto":
        kind = "cosine" if cosine else "step"
    if kind == "step":
        return EpochStepDecay(base_lr, steps_per_epoch)
    if kind == "cosine":
        return EpochCosineDecay(base_lr, steps_per_epoch, total_steps)
    if kind == "constant":
        return float(base_lr)
    raise ValueError(f"schedule: expected auto, step, cosine or constant, got {kind!r}")
