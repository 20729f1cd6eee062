"""What a training run shows: loss curves for TensorBoard and a readable console.

:func:`aldk_tf.training.run.train` runs one Keras ``fit`` per release epoch. Keras'
``TensorBoard`` callback numbers its batch summaries from 0 again in every ``fit`` and
writes one only every ``update_freq`` batches, so runs with shorter epochs had no loss
curve at all; Keras' progress bar says ``Epoch 4/4`` in the fourth of six epochs. Here:

- :class:`LossCurves` writes every tracked quantity of the trainer (the loss and its
  terms) to ``<run>/logs/train`` as ``loss/<name>``: the mean over the last ``every``
  steps, at the global step (the optimizer's step counter, which never restarts, also
  across a resume), and ``epoch/<name>``: the mean over the epoch, at its last step.
  The means come from the trackers' running totals (``keras.metrics.Mean``), so a term
  that exists only on some steps (ALDK's adversarial terms) averages over those.
- :class:`EpochProgress` is Keras' progress bar with the run's real epoch count.
- :func:`quiet_training_graph` keeps grappler's ``remapper failed: ... LeakyReluGrad``
  error out of the log.
"""

from __future__ import annotations

import contextlib
import os

import keras
import numpy as np
import tensorflow as tf

#: Longest interval between two points of a loss curve (steps).
MAX_LOG_EVERY = 50
#: Points per curve aimed at by the default interval (short runs log every step).
CURVE_POINTS = 200
TRAIN_LOG = "train"


def log_interval(total_steps: int, every: int | None = None) -> int:
    """Steps between two points of a loss curve: ``every`` when given, else enough for
    about :data:`CURVE_POINTS` points, at least every :data:`MAX_LOG_EVERY` steps."""
    if every is not None:
        if int(every) < 1:
            raise ValueError(f"--log-every: expected an integer >= 1, got {every}")
        return int(every)
    return max(1, min(MAX_LOG_EVERY, int(total_steps) // CURVE_POINTS))


class LossCurves(keras.callbacks.Callback):
    """Loss curves on the global step (see the module docstring).

    ``step_variable`` is the optimizer's step counter (the step just done after each
    batch); ``every`` the interval (:func:`log_interval`).
    """

    def __init__(self, log_dir: str | None, step_variable, every: int):
        super().__init__()
        # log_dir None: a worker that writes nothing but reads the trackers as the chief
        # does (under a multi-worker strategy reading them is a collective: every worker
        # must make the same reads in the same order, or the cluster hangs).
        self.path = os.path.join(log_dir, TRAIN_LOG) if log_dir else None
        self.writer = tf.summary.create_file_writer(self.path) if log_dir else None
        self.step_variable, self.every = step_variable, int(every)
        self.epoch_start: dict[str, tuple[float, float]] = {}
        self.window_start: dict[str, tuple[float, float]] = {}
        self.written_step = self.step = -1

    def totals(self) -> dict[str, tuple[float, float]]:
        """``{name: (total, count)}`` of the trainer's mean trackers."""
        found = {}
        for metric in self.model.metrics:
            total, count = getattr(metric, "total", None), getattr(metric, "count", None)
            if total is not None and count is not None:
                found[metric.name] = (float(np.asarray(total)), float(np.asarray(count)))
        return found

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start = self.window_start = self.totals()   # trackers just reset

    def on_train_batch_end(self, batch, logs=None):
        self.step = int(np.asarray(self.step_variable))
        if self.step % self.every == 0:
            self._write_window()

    def on_epoch_end(self, epoch, logs=None):
        if self.step < 0:
            return
        if self.written_step != self.step:           # the epoch's last, shorter window
            self._write_window()
        self._write("epoch", self.epoch_start, self.totals())
        if self.writer is not None:
            self.writer.flush()

    def on_train_end(self, logs=None):
        if self.writer is not None:
            self.writer.flush()

    def _write_window(self) -> None:
        now = self.totals()
        self._write("loss", self.window_start, now)
        self.window_start, self.written_step = now, self.step

    def _write(self, prefix: str, start: dict, end: dict) -> None:
        if self.writer is None:
            return
        # record_if(True): a fit that ended in an error can leave Keras' recording
        # condition behind in this process.
        with self.writer.as_default(), tf.summary.record_if(True):
            for name, (total, count) in end.items():
                first_total, first_count = start.get(name, (0.0, 0.0))
                if count > first_count:
                    tf.summary.scalar(f"{prefix}/{name}",
                                      (total - first_total) / (count - first_count),
                                      step=self.step)


class EpochProgress(keras.callbacks.ProgbarLogger):
    """Keras' progress bar, saying ``Epoch k/N`` with the run's ``N`` epochs (each
    ``fit`` of the run is one of them)."""

    def __init__(self, epochs: int):
        super().__init__()
        self.total_epochs = int(epochs)

    def set_params(self, params):
        super().set_params(params)
        self.epochs = self.total_epochs


@contextlib.contextmanager
def quiet_training_graph():
    """Grappler's remapper without the Conv3D + LeakyReLU fusion it fails on.

    The remapper tries to fuse each convolution with its LeakyReLU, but in a training
    graph the pre-activation also feeds ``LeakyReluGrad``, so the rewrite fails, grappler
    logs ``remapper failed: INVALID_ARGUMENT: Mutation::Apply error: fanout ...
    LeakyReluGrad`` and keeps the graph as it was before the remapper. Turning the
    remapper off while the training function is built gives that same graph without the
    error (graphs built outside, e.g. inference, keep it).
    """
    previous = tf.config.optimizer.get_experimental_options()
    tf.config.optimizer.set_experimental_options({"remapping": False})
    try:
        yield
    finally:
        tf.config.optimizer.set_experimental_options(
            {"remapping": previous.get("remapping", True)})
