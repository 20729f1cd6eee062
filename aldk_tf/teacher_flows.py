"""Teacher-flow extraction: the frozen teacher's final aggregate flow per training pair.

Stored once, float16, in ``weights/<teacher run>/teacher_flows.h5`` under the release's
key ``"<fixed id>-<moving id>"`` (ids are ``prefix/scan``, so the key is an HDF5 path),
and reused by every later student run. Extraction shows progress and resumes: a pair is
written with a ``complete`` attribute last, so a pair cut off by a kill is redone.
"""

from __future__ import annotations

import logging
import os
import sys

import h5py
import keras
import numpy as np
import tensorflow as tf

from aldk_tf.runs import TEACHER_FLOWS_NAME, RunError

log = logging.getLogger(__name__)


def pair_key(fixed_id: str, moving_id: str) -> str:
    return f"{fixed_id}-{moving_id}"


def flows_path(teacher_run: str) -> str:
    return os.path.join(teacher_run, TEACHER_FLOWS_NAME)


def _open(path: str) -> h5py.File:
    try:
        return h5py.File(path, "a")
    except OSError as error:
        # A file cut off by a kill while its header was being written: start again.
        broken = path + ".broken"
        log.warning("%s: unreadable (%s); moved to %s and starting over", path, error,
                    broken)
        os.replace(path, broken)
        return h5py.File(path, "a")


def stored_keys(path: str) -> set[str]:
    """Keys of the complete flows in a flow file (empty if it does not exist)."""
    if not os.path.exists(path):
        return set()
    keys = set()
    with _open(path) as handle:
        def visit(name, node):
            if isinstance(node, h5py.Dataset) and node.attrs.get("complete", False):
                keys.add(name)
        handle.visititems(visit)
    return keys


def missing_pairs(path: str, pairs) -> list[tuple[str, str]]:
    done = stored_keys(path)
    return [pair for pair in pairs if pair_key(*pair) not in done]


def extract_teacher_flows(teacher, dataset_config, pairs, path: str, batch_size: int = 1,
                          progress: bool = True) -> int:
    """Run ``teacher`` on every pair whose flow is not stored yet; return how many ran."""
    from aldk_tf.data import load_pair

    todo = missing_pairs(path, pairs)
    if not todo:
        return 0
    register = tf.function(teacher.registration_model(), reduce_retracing=True)
    bar = keras.utils.Progbar(len(todo), unit_name="pair",
                              verbose=1 if sys.stderr.isatty() else 2) if progress else None
    with _open(path) as handle:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            loaded = [load_pair(dataset_config, f, m) for f, m in chunk]
            inputs = {key: np.stack([p[key] for p in loaded]).astype(np.float32)
                      for key in ("fixed", "moving")}
            flows = register(inputs)["flow"].numpy().astype(np.float16)
            for (fixed_id, moving_id), flow in zip(chunk, flows):
                key = pair_key(fixed_id, moving_id)
                if key in handle:
                    del handle[key]
                dataset = handle.create_dataset(key, data=flow)
                dataset.attrs["complete"] = True
            handle.flush()
            if bar is not None:
                bar.add(len(chunk))
    return len(todo)


class TeacherFlowStore:
    """Read access to a flow file by pair: ``store.read(fixed_id, moving_id)``."""

    def __init__(self, path: str):
        if not os.path.exists(path):
            raise RunError(f"{path}: teacher flows not found; run the extraction first")
        self.path = path
        self.handle = h5py.File(path, "r")

    def read(self, fixed_id: str, moving_id: str) -> np.ndarray:
        key = pair_key(fixed_id, moving_id)
        if key not in self.handle:
            raise RunError(f"{self.path}: no teacher flow for pair {key}")
        return np.asarray(self.handle[key], dtype=np.float32)

    def close(self) -> None:
        self.handle.close()
