"""The layout of a run directory (``weights/<run>/``) and loading a trained model from it.

```
weights/<run>/
  config.json            RunConfig (model, losses, training, ALDK settings, dataset)
  model.weights.h5       the registration model's weights (latest finished state)
  checkpoints/           tf.train.CheckpointManager: model, critic, optimizers, step
  teacher_flows.h5       (teachers) stored final flows, float16, keyed "<fixed>-<moving>"
  logs/                  TensorBoard
  .lock                  held (flock) by the training run using the directory
```
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil

from aldk_tf.config import CONFIG_NAME, RunConfig

WEIGHTS_NAME = "model.weights.h5"
CHECKPOINT_DIR = "checkpoints"
TEACHER_FLOWS_NAME = "teacher_flows.h5"
LOG_DIR = "logs"
LOCK_NAME = ".lock"


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
    try:
        return RunConfig.load(run_dir)
    except (OSError, ValueError) as error:
        raise RunError(str(error)) from None


#: Weights of the best validation Dice (written when a run validates).
BEST_WEIGHTS_NAME = "best.weights.h5"


def load_model(run_dir: str, rep: int | None = None, best: bool = False):
    """``(RunConfig, RecursiveCascade)`` with the run's trained weights loaded.

    ``rep`` overrides the shared-weight repetition (RCN's test-time ``-r``). ``best``:
    the weights of the best validation Dice (``best.weights.h5``) where the run has them.
    """
    config = load_run_config(run_dir)
    path = weights_path(run_dir)
    if best and os.path.isfile(os.path.join(run_dir, BEST_WEIGHTS_NAME)):
        path = os.path.join(run_dir, BEST_WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise RunError(f"{run_dir}: no {WEIGHTS_NAME}; the run has not saved weights yet")
    model = config.model.build(rep=rep)
    load_weights_file(model, path)
    return config, model


def load_weights_file(model, path: str) -> None:
    """``model.load_weights(path)``; a truncated or foreign file is a :class:`RunError`
    naming it."""
    try:
        model.load_weights(path)
    except (OSError, ValueError, KeyError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else \
            type(error).__name__
        raise RunError(f"{path}: unreadable weights ({reason}); expected the "
                       f"{WEIGHTS_NAME} that train.py wrote for this model") from None


# ------------------------------------------------------------- claiming a run directory
def has_checkpoint(run_dir: str) -> bool:
    return os.path.isfile(os.path.join(run_dir, CHECKPOINT_DIR, "checkpoint"))


def _lock(run_dir: str):
    """The open, exclusively locked ``<run>/.lock`` (RunError if another process holds
    it). The OS drops the lock when the process ends, however it ends."""
    path = os.path.join(run_dir, LOCK_NAME)
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise RunError(f"{run_dir}: another training run holds this directory "
                       f"({LOCK_NAME} is locked); wait for it to end or choose another "
                       f"--output") from None
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


@contextlib.contextmanager
def claim_run(run_dir: str, new: bool):
    """Hold ``run_dir`` for one training run: an OS lock on ``<run>/.lock`` for the whole
    block, so a second run on the same directory stops with a :class:`RunError`.

    ``new``: the directory is created if needed and must not hold a run yet; when the
    block fails before the run saved a checkpoint, whatever this start created is removed
    again, parent folders (``--weights-dir``) included: a failed start leaves no run
    directory behind. A resumed run's directory is
    never removed.
    """
    created, parents = False, []
    if new:
        parent = os.path.dirname(os.path.abspath(run_dir))
        while not os.path.exists(parent):        # made here, removed again on failure
            parents.append(parent)
            parent = os.path.dirname(parent)
        os.makedirs(os.path.dirname(os.path.abspath(run_dir)), exist_ok=True)
        try:
            os.mkdir(run_dir)
            created = True
        except FileExistsError:
            pass
    elif not os.path.isdir(run_dir):
        raise RunError(f"{run_dir}: run directory not found")
    before = set(os.listdir(run_dir))
    handle = _lock(run_dir)            # on failure: another run owns what is here
    try:
        if new and os.path.exists(os.path.join(run_dir, CONFIG_NAME)):
            raise RunError(f"{run_dir}: a run already exists here; resume it with "
                           f"-c {run_dir} or choose another --output")
        yield
    except BaseException:
        if new and not has_checkpoint(run_dir):
            _remove_created(run_dir, created, before)
            for folder in parents:                # deepest first, only when empty
                with contextlib.suppress(OSError):
                    os.rmdir(folder)
        raise
    finally:
        handle.close()


def _remove_created(run_dir: str, created: bool, before: set[str]) -> None:
    if created:
        shutil.rmtree(run_dir, ignore_errors=True)
        return
    for name in set(os.listdir(run_dir)) - before:
        path = os.path.join(run_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)


# ----------------------------------------------------------- settings of a resumed run
def _flat(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def settings(config: RunConfig) -> dict:
    """``{"train.lr": 0.0001, ...}``: every setting of ``config`` as JSON stores it
    (without the history of changes)."""
    data = json.loads(json.dumps(config.to_dict()))
    data.pop("history", None)
    return _flat(data)


def setting_changes(old: RunConfig, new: RunConfig) -> dict:
    """``{setting: [old value, new value]}`` for every setting that differs."""
    before, after = settings(old), settings(new)
    return {key: [before.get(key), after.get(key)] for key in sorted(before.keys()
                                                                     | after.keys())
            if before.get(key) != after.get(key)}


def describe_changes(changes: dict) -> str:
    return ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changes.items())


def check_settings(run_dir: str, config: RunConfig) -> None:
    """:class:`RunError` when ``config`` would change the settings the run in
    ``run_dir`` was trained with without recording it: a change is accepted only when
    it is the last entry of ``config.history``."""
    if not os.path.isfile(os.path.join(run_dir, CONFIG_NAME)):
        return
    stored = RunConfig.load(run_dir)
    changes = setting_changes(stored, config)
    if not changes:
        return
    recorded = (len(config.history) > len(stored.history)
                and config.history[-1].get("changes") == changes)
    if not recorded:
        raise RunError(f"{run_dir}: the run was trained with other settings "
                       f"({describe_changes(changes)}); use them, or record the change "
                       f"(train.py -c {run_dir} ... --override)")
