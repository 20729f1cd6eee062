"""Teacher-flow extraction: the frozen teacher's final aggregate flow per training pair.

Stored once, float16, in ``weights/<teacher run>/teacher_flows.h5`` under the release's
key ``"<fixed id>-<moving id>"`` (ids are ``prefix/scan``, so the key is an HDF5 path),
and reused by every later student run. Extraction shows progress and resumes: a pair is
written with a ``complete`` attribute last, so a pair cut off by a kill is redone.

Extraction can be split across machines: shard ``i/n`` (:mod:`aldk_tf.shards`) writes
``teacher_flows.shard-i-of-n.h5`` beside the teacher, and a merge copies the parts into
``teacher_flows.h5``, which then holds exactly what an unsharded extraction writes::

    python -m aldk_tf.teacher_flows --teacher weights/<run> -d data.json --shard 2/3
    python -m aldk_tf.teacher_flows --teacher weights/<run> -d data.json --merge
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

import h5py
import keras
import numpy as np
import tensorflow as tf

from aldk_tf.runs import TEACHER_FLOWS_NAME, RunError
from aldk_tf.shards import Shard, ShardError, check_complete, find_parts, split_name

log = logging.getLogger(__name__)


def pair_key(fixed_id: str, moving_id: str) -> str:
    return f"{fixed_id}-{moving_id}"


def flows_path(teacher_run: str, shard: Shard | None = None) -> str:
    """The teacher's flow file, or the part file of ``shard``."""
    if shard is None:
        return os.path.join(teacher_run, TEACHER_FLOWS_NAME)
    stem, suffix = os.path.splitext(TEACHER_FLOWS_NAME)
    return os.path.join(teacher_run, shard.name(stem, suffix))


def _open(path: str) -> h5py.File:
    try:
        return h5py.File(path, "a")
    except OSError as error:
        if "lock" in str(error) or "already open" in str(error):
            raise RunError(f"{path}: in use by another reader or writer ({error})") \
                from None
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
    try:
        handle = h5py.File(path, "r")
    except OSError:
        handle = _open(path)                # unreadable: set aside, or in use: an error
    with handle:
        return _complete_keys(handle)


def _complete_keys(handle: h5py.File) -> set[str]:
    keys = set()

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
                _write_flow(handle, pair_key(fixed_id, moving_id), flow)
            handle.flush()
            if bar is not None:
                bar.add(len(chunk))
    return len(todo)


def _write_flow(handle: h5py.File, key: str, flow: np.ndarray) -> None:
    if key in handle:
        del handle[key]
    dataset = handle.create_dataset(key, data=flow)
    dataset.attrs["complete"] = True                # last: a cut-off write is redone


def merge_teacher_flows(path: str, parts: list[str]) -> int:
    """Copy the complete flows of the shard files ``parts`` (all of 1/n .. n/n) into the
    flow file ``path``; flows it already holds are kept. Returns how many were copied."""
    check_complete([_part_shard(part) for part in parts], path)
    copied = 0
    with _open(path) as out:
        done = _complete_keys(out)
        for part in parts:
            with h5py.File(part, "r") as source:
                for key in sorted(_complete_keys(source) - done):
                    _write_flow(out, key, source[key][()])
                    done.add(key)
                    copied += 1
            out.flush()
    return copied


def _part_shard(path: str) -> Shard:
    named = split_name(path, os.path.splitext(TEACHER_FLOWS_NAME)[1])
    if named is None:
        raise ShardError(f"{path}: not a teacher-flow shard part "
                         "(teacher_flows.shard-<i>-of-<n>.h5)")
    return named[1]


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


def main(argv=None) -> int:
    """``python -m aldk_tf.teacher_flows``: extract (a shard of) the teacher flows, or
    merge the shards; one-line errors, exit code 2."""
    parser = argparse.ArgumentParser(
        prog="python -m aldk_tf.teacher_flows",
        description="Store a teacher's final flows of every training pair (for ALDK).")
    parser.add_argument("--teacher", required=True, help="teacher run, weights/<run>")
    parser.add_argument("-d", "--dataset", help="dataset JSON whose training pairs to "
                        "extract (default: the teacher run's)")
    parser.add_argument("--shard", help="extract only shard i/n of the pairs (1-based, "
                        "every n-th pair) into teacher_flows.shard-i-of-n.h5")
    parser.add_argument("--merge", action="store_true", help="merge the shard files into "
                        "teacher_flows.h5 (then removed unless --keep_parts)")
    parser.add_argument("--keep_parts", action="store_true")
    parser.add_argument("--batch", type=int, default=1, help="pairs per teacher call")
    args = parser.parse_args(argv)
    from aldk_tf import runs
    from aldk_tf.data import TRAINING_SCHEME, DataError, list_pairs, load_dataset_config
    try:
        if args.merge and args.shard:
            raise ShardError("--merge and --shard exclude each other")
        shard = Shard.parse(args.shard) if args.shard else None
        teacher_config = runs.load_run_config(args.teacher)
        dataset_config = load_dataset_config(args.dataset or teacher_config.dataset)
        pairs = list_pairs(dataset_config, TRAINING_SCHEME)
        path = flows_path(args.teacher)
        if args.merge:
            stem, suffix = os.path.splitext(TEACHER_FLOWS_NAME)
            parts = find_parts(args.teacher, stem, suffix)
            copied = merge_teacher_flows(path, parts)
            missing = missing_pairs(path, pairs)
            if missing:
                raise RunError(f"{path}: {len(missing)} of {len(pairs)} pairs still "
                               f"missing after the merge (e.g. {pair_key(*missing[0])}); "
                               f"finish the shards and merge again")
            if not args.keep_parts:
                for part in parts:
                    os.remove(part)
            print(f"merged {len(parts)} parts ({copied} flows) into {path}")
            return 0
        if tuple(teacher_config.model.image_size) != tuple(dataset_config.image_size):
            raise RunError(f"{args.teacher}: teacher image size "
                           f"{tuple(teacher_config.model.image_size)} differs from "
                           f"{dataset_config.where}'s {tuple(dataset_config.image_size)}")
        if shard is not None:
            done = stored_keys(path)
            pairs = [pair for pair in shard.select(pairs) if pair_key(*pair) not in done]
            path = flows_path(args.teacher, shard)
            _open(path).close()               # exists even when it has nothing to do
        _, teacher = runs.load_model(args.teacher)
        count = extract_teacher_flows(teacher, dataset_config, pairs, path, args.batch)
        print(f"{count} flows extracted into {path}")
        return 0
    except (RunError, DataError, ShardError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
