"""The layout of a run directory (``weights/<run>/``) and loading a trained model from it.

```
weights/<run>/
  config.json            RunConfig (model, losses, training, ALDK settings, dataset)
  model.weights.h5       the registration model's weights (latest finished state)
  checkpoints/           tf.train.CheckpointManager: model, critic, optimizers, step
  teacher_flows.h5       (teachers) stored final flows, float16, keyed "<fixed>-<moving>"
  logs/                  TensorBoard
```
"""

from __future__ import annotations

import os

from aldk_tf.config import CONFIG_NAME, RunConfig

WEIGHTS_NAME = "model.weights.h5"
CHECKPOINT_DIR = "checkpoints"
TEACHER_FLOWS_NAME = "teacher_flows.h5"
LOG_DIR = "logs"


class RunError(ValueError):
    """A run directory that cannot be used (one-line message naming the path)."""


def weights_path(run_dir: str) -> str:
    return os.path.join(run_dir, WEIGHTS_NAME)


def load_run_config(run_dir: str) -> RunConfig:
    if not os.path.isdir(run_dir):
        raise RunError(f"{run_dir}: run directory not found")
    if not os.path.isfile(os.path.join(run_dir, CONFIG_NAME)):
        raise RunError(f"{run_dir}: no {CONFIG_NAME}; expected a run directory written "
                       f"by train.py")
    return RunConfig.load(run_dir)


def load_model(run_dir: str, rep: int | None = None):
    """``(RunConfig, RecursiveCascade)`` with the run's trained weights loaded.

    ``rep`` overrides the shared-weight repetition (RCN's test-time ``-r``).
    """
    config = load_run_config(run_dir)
    path = weights_path(run_dir)
    if not os.path.isfile(path):
        raise RunError(f"{run_dir}: no {WEIGHTS_NAME}; the run has not saved weights yet")
    model = config.model.build(rep=rep)
    model.load_weights(path)
    return config, model
