"""Checkpoints of a training run: network, critic, both optimizers (hence the step).

``tf.train.CheckpointManager`` under ``weights/<run>/checkpoints`` keeps the last few;
the step counter is the student/teacher optimizer's ``iterations``, so a restored run
continues at the same step and the same position of every schedule. A run killed at
any moment loses at most one checkpoint interval.

Checkpoints hold each variable once (a mirrored variable's value, not one copy per
replica), so a run saved under a ``tf.distribute`` strategy restores without one and
the other way round. In a multi-worker run every worker takes part in each save, as
TensorFlow asks, but only the chief writes the run directory; the others write to a
scratch folder they delete straight away.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile

import keras
import tensorflow as tf

from aldk_tf.training.runs import CHECKPOINT_DIR, RunError, weights_path

log = logging.getLogger(__name__)


class RunCheckpoint:
    """Save/restore everything a run needs to continue exactly."""

    def __init__(self, run_dir: str, network, optimizer, critic=None, critic_optimizer=None,
                 max_to_keep: int = 2, extra: dict | None = None, chief: bool = True):
        objects = {"network": network, "optimizer": optimizer, **(extra or {})}
        if critic is not None:
            objects.update(critic=critic, critic_optimizer=critic_optimizer)
        self.optimizer = optimizer
        self.checkpoint = tf.train.Checkpoint(**objects)
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, os.path.join(run_dir, CHECKPOINT_DIR), max_to_keep=max_to_keep)
        self.chief = chief

    @property
    def step(self) -> int:
        return int(self.optimizer.iterations.numpy())

    def restore(self) -> int:
        """Restore the newest readable checkpoint if there is one; return the step reached.

        An unreadable newest checkpoint (truncated, corrupt) is skipped with a warning
        for the one before it. A checkpoint whose variables do not all match the model's
        (its settings changed) is a :class:`RunError`: never a partial restore.
        """
        if self.chief:
            _remove_unfinished_saves(self.manager.directory)
        skipped = []                        # (path, reason), newest first
        for path in reversed(self.manager.checkpoints):
            reason = unreadable_reason(path)
            if reason is None:
                break
            skipped.append((path, reason))
        else:
            if skipped:
                raise RunError(f"{self.manager.directory}: no readable checkpoint "
                               f"({skipped[0][0]}: {skipped[0][1]}); move the folder "
                               f"away to start the run again")
            return self.step
        for bad, reason in skipped:
            log.warning("%s: unreadable checkpoint (%s); resuming from %s", bad, reason,
                        path)
        status = None
        try:
            status = self.checkpoint.restore(path)
            status.assert_consumed()
        except (AssertionError, ValueError) as error:
            if status is not None:
                status.expect_partial()
            raise RunError(f"{path}: the checkpoint does not match the model "
                           f"({str(error).split('.')[0]}); the run's model settings "
                           f"changed since it was saved") from None
        log.info("restored %s at step %d", path, self.step)
        return self.step

    def save(self) -> str | None:
        if self.chief:
            try:
                return self.manager.save(checkpoint_number=self.step)
            except (tf.errors.OpError, OSError) as error:     # e.g. a full disk
                _remove_unfinished_saves(self.manager.directory)
                previous = self.manager.latest_checkpoint
                raise RunError(
                    f"{self.manager.directory}: cannot write the checkpoint of step "
                    f"{self.step} ({write_failure(error)}); "
                    + (f"{os.path.basename(previous)} is intact, resume from it with -c "
                       "once the cause is fixed" if previous else
                       "no earlier checkpoint")) from None
        scratch = tempfile.mkdtemp(prefix="aldk-worker-checkpoint-")
        try:
            self.checkpoint.write(os.path.join(scratch, "ckpt"))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return None


def unreadable_reason(path: str) -> str | None:
    """Why the checkpoint ``path`` cannot be read in full (None: every tensor reads)."""
    try:
        reader = tf.train.load_checkpoint(path)
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
    except (tf.errors.OpError, IndexError, ValueError, OSError) as error:
        text = str(error).strip().splitlines()
        return text[0] if text else type(error).__name__
    return None


def write_failure(error: Exception) -> str:
    """The reason of a failed write, without TensorFlow's op prefix and temporary names."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = str(getattr(error, "message", error)).strip()
    text = text.splitlines()[0] if text else type(error).__name__
    return text.rsplit("; ", 1)[-1].split(" [Op:")[0].strip()


def _remove_unfinished_saves(directory: str) -> None:
    """``ckpt-N_temp/`` folders of saves cut off by a kill or a full disk."""
    if os.path.isdir(directory):
        for name in os.listdir(directory):
            if name.endswith("_temp") and os.path.isdir(os.path.join(directory, name)):
                shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def save_weights_atomic(network, run_dir: str, name: str | None = None) -> str:
    """Write ``model.weights.h5`` (or ``name``) through a temporary file and a rename."""
    path = weights_path(run_dir) if name is None else os.path.join(run_dir, name)
    temporary = os.path.join(run_dir, ".saving.weights.h5")
    try:
        network.save_weights(temporary)
        os.replace(temporary, path)
    except (OSError, RuntimeError, ValueError) as error:     # e.g. a full disk
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise RunError(f"{path}: cannot write the weights ({write_failure(error)}); "
                       + ("the previous file is intact" if os.path.exists(path) else
                          "the checkpoints hold them")) from None
    return path


class CheckpointCallback(keras.callbacks.Callback):
    """Checkpoint every ``every`` steps and at the end of training."""

    def __init__(self, run_checkpoint: RunCheckpoint, every: int, run_dir: str, network,
                 write_weights: bool = True):
        super().__init__()
        self.run_checkpoint, self.every = run_checkpoint, max(int(every), 1)
        self.run_dir, self.network = run_dir, network
        self.write_weights = write_weights          # False on non-chief workers

    def on_train_batch_end(self, batch, logs=None):
        if self.run_checkpoint.step % self.every == 0:
            self.run_checkpoint.save()

    def on_epoch_end(self, epoch, logs=None):
        if self.write_weights:
            save_weights_atomic(self.network, self.run_dir)

    def on_train_end(self, logs=None):
        self.run_checkpoint.save()
        if self.write_weights:
            save_weights_atomic(self.network, self.run_dir)
