"""Teacher-flow extraction: the frozen teacher's final aggregate flow per training pair.

Stored once, float16, in ``weights/<teacher run>/teacher_flows.h5`` under the release's
key ``"<fixed id>-<moving id>"`` (ids are ``prefix/scan``, so the key is an HDF5 path),
and reused by every later student run. Extraction shows progress and resumes: a pair is
written with a ``complete`` attribute last, so a pair cut off by a kill is redone.

Extraction can be split across machines: shard ``i/n`` (:mod:`aldk_tf.shards`) writes
``teacher_flows.shard-i-of-n.h5`` beside the teacher, and a merge copies the parts into
``teacher_flows.h5``, which then holds exactly what an unsharded extraction writes::

    python -m aldk_tf.training.teacher_flows -c weights/<run> -d data.json --shard 2/3
    python -m aldk_tf.training.teacher_flows -c weights/<run> -d data.json --merge

With ``refine=N`` (``--refine N``) each teacher flow is refined by N steps of instance
optimisation (:mod:`aldk_tf.training.refine`) before it is stored, so the targets are better than
the teacher itself. The file and every flow record the setting (attributes
``refine_steps`` and ``refine_learning_rate``); a file written with another setting is
refused, never mixed or silently reused; each setting has its own file
(``teacher_flows-refine<N>.h5``). Pairs with segmentations also record the Dice
(and % folding voxels) of the raw teacher flow and of the stored one
(``dice_teacher``/``dice_stored``, ``folding_teacher``/``folding_stored``), which
:func:`refinement_summary` averages.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys

import h5py
import keras
import numpy as np
import tensorflow as tf

from aldk_tf import metrics
from aldk_tf.config import MAX_REP
from aldk_tf.training.refine import DEFAULT_LEARNING_RATE, refine_flow
from aldk_tf.training.refine import add_arguments as add_refine_arguments
from aldk_tf.training.refine import check_arguments as check_refine_arguments
from aldk_tf.training.runs import TEACHER_FLOWS_NAME, RunError
from aldk_tf.shards import Shard, ShardError, check_complete, find_parts, split_name

log = logging.getLogger(__name__)


def pair_key(fixed_id: str, moving_id: str) -> str:
    return f"{fixed_id}-{moving_id}"


def teacher_fingerprint(teacher) -> str:
    """SHA-256 of the teacher's weights (shapes and values, in order)."""
    digest = hashlib.sha256()
    for weight in teacher.get_weights():
        weight = np.ascontiguousarray(weight)
        digest.update(str(weight.shape).encode())
        digest.update(weight.tobytes())
    return digest.hexdigest()


def scan_fingerprints(dataset_config, pairs) -> dict[str, str]:
    """``{scan id: SHA-256 of its voxels}`` for every scan the pairs use."""
    from aldk_tf.data import ScanStore
    with ScanStore(dataset_config) as store:
        return {scan: hashlib.sha256(np.ascontiguousarray(
                    store.read(scan)["volume"]).tobytes()).hexdigest()
                for scan in sorted({scan for pair in pairs for scan in pair})}


def provenance(teacher, dataset_config, pairs) -> dict:
    """What stored flows depend on: the teacher's weights (``teacher_sha256``) and how
    often its cascades are applied (``teacher_rep``), both recorded on the file, and each
    scan's voxels (``scans``, recorded on every flow as ``fixed_sha256`` /
    ``moving_sha256``)."""
    return {"teacher_sha256": teacher_fingerprint(teacher),
            "teacher_rep": teacher_rep(teacher),
            "scans": scan_fingerprints(dataset_config, pairs)}


def teacher_rep(teacher) -> int:
    """The shared-weight repetitions the teacher model applies (1 for other models)."""
    return int(getattr(teacher, "rep", 1))


def stale_reason(path: str, expected: dict) -> str | None:
    """Why the flow file at ``path`` does not belong to ``expected`` (None: it does, or
    there is no file). Files without fingerprints cannot be trusted either."""
    if not os.path.exists(path):
        return None
    unreadable = unreadable_reason(path)
    if unreadable is not None:
        return unreadable
    with h5py.File(path, "r") as handle:
        keys = _complete_keys(handle)
        if not keys:
            return None
        stored = handle.attrs.get("teacher_sha256")
        if stored is None:
            return "it records no fingerprint of the teacher weights"
        if stored != expected["teacher_sha256"]:
            return "the teacher's weights changed since its flows were stored"
        if int(handle.attrs.get("teacher_rep", 1)) != expected.get("teacher_rep", 1):
            return (f"its flows were made with {int(handle.attrs.get('teacher_rep', 1))} "
                    f"teacher repetitions, not {expected['teacher_rep']}")
        scans = expected["scans"]
        for key in sorted(keys):
            attrs = handle[key].attrs
            for side in ("fixed", "moving"):
                scan = attrs.get(f"{side}_id")
                if scan is None or attrs.get(f"{side}_sha256") is None:
                    return f"flow {key} records no fingerprint of its scans"
                if scan in scans and attrs[f"{side}_sha256"] != scans[scan]:
                    return f"scan {scan} changed since flow {key} was stored"
    return None


def set_aside_if_stale(path: str, expected: dict) -> str | None:
    """Move a flow file that belongs to another teacher or other data to ``.stale`` (it
    is then extracted again); returns the reason, or None when it is current."""
    reason = stale_reason(path, expected)
    if reason is not None:
        os.replace(path, path + ".stale")
        log.warning("%s: %s; moved to %s.stale, extracting again", path, reason, path)
    return reason


def flows_stem(refine: int = 0, rep: int = 1) -> tuple[str, str]:
    """``(stem, suffix)`` of the flow file of a setting: ``teacher_flows.h5`` for the
    raw flows, ``teacher_flows-rep<R>.h5`` for a teacher applied with R shared-weight
    repetitions, ``...-refine<N>.h5`` for flows refined by N steps (so the targets of
    every setting of one teacher live side by side)."""
    stem, suffix = os.path.splitext(TEACHER_FLOWS_NAME)
    if rep > 1:
        stem += f"-rep{int(rep)}"
    if refine:
        stem += f"-refine{int(refine)}"
    return stem, suffix


def flows_path(teacher_run: str, shard: Shard | None = None, refine: int = 0,
               rep: int = 1) -> str:
    """The teacher's flow file for ``refine`` steps and ``rep`` repetitions, or the part
    file of ``shard``."""
    stem, suffix = flows_stem(refine, rep)
    if shard is None:
        return os.path.join(teacher_run, stem + suffix)
    return os.path.join(teacher_run, shard.name(stem, suffix))


def _in_use(error: OSError) -> bool:
    """Whether HDF5 refused ``error``'s file because another process holds it (not, for
    example, because it is truncated: that message mentions the "sblock")."""
    return "unable to lock file" in str(error) or "already open" in str(error)


def unreadable_reason(path: str) -> str | None:
    """Why the flow file at ``path`` cannot be opened (truncated, not HDF5); None when
    it opens. RunError when another process holds it."""
    try:
        h5py.File(path, "r").close()
    except OSError as error:
        if _in_use(error):
            raise RunError(f"{path}: in use by another reader or writer ({error})") \
                from None
        return f"it is unreadable ({str(error).splitlines()[0]})"
    return None


def check_flow_shapes(path: str, image_size) -> None:
    """RunError naming ``path`` and a flow unless every stored flow is
    ``[*image_size, 3]`` (read from the file's metadata, no voxels)."""
    expected = (*(int(n) for n in image_size), 3)
    with h5py.File(path, "r") as handle:
        for key in sorted(_complete_keys(handle)):
            shape = tuple(handle[key].shape)
            if shape != expected:
                raise RunError(f"{path}: flow {key} has shape {shape}, expected "
                               f"{expected} for this run's image size; move the file "
                               f"away to extract the flows again")


def _open(path: str) -> h5py.File:
    try:
        return h5py.File(path, "a")
    except OSError as error:
        if _in_use(error):
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


def refine_setting(steps: int = 0,
                   learning_rate: float = DEFAULT_LEARNING_RATE) -> dict:
    """The attributes that record how stored flows were refined (steps 0: not at all)."""
    try:
        check_refine_arguments(steps, learning_rate)
    except ValueError as error:
        raise RunError(str(error)) from None
    if steps == 0:
        return {"refine_steps": 0}
    return {"refine_steps": int(steps), "refine_learning_rate": float(learning_rate)}


def stored_setting(handle: h5py.File) -> dict:
    """The refine setting a flow file was written with (files from before refinement
    existed hold unrefined flows: ``refine_steps`` 0)."""
    steps = int(handle.attrs.get("refine_steps", 0))
    if steps == 0:
        return {"refine_steps": 0}
    return {"refine_steps": steps,
            "refine_learning_rate": float(handle.attrs["refine_learning_rate"])}


def check_setting(path: str, handle: h5py.File, setting: dict) -> None:
    """:class:`RunError` when ``handle`` holds flows made with another refine setting."""
    if not _complete_keys(handle):
        return
    stored = stored_setting(handle)
    if stored != setting:
        raise RunError(f"{path}: flows stored with {_describe(stored)}, requested "
                       f"{_describe(setting)}; pass the same setting, or move the file "
                       "away to extract again")


def _describe(setting: dict) -> str:
    if setting["refine_steps"] == 0:
        return "--refine 0"
    return (f"--refine {setting['refine_steps']} "
            f"--refine-lr {setting['refine_learning_rate']:g}")


def check_flow_file(path: str, refine: int = 0,
                    refine_learning_rate: float = DEFAULT_LEARNING_RATE) -> None:
    """:class:`RunError` unless the flow file at ``path`` (if any) matches the setting.

    An unreadable file passes: opening it for writing sets it aside or reports it."""
    setting = refine_setting(refine, refine_learning_rate)
    if not os.path.exists(path):
        return
    try:
        handle = h5py.File(path, "r")
    except OSError:
        return
    with handle:
        check_setting(path, handle, setting)


def extract_teacher_flows(teacher, dataset_config, pairs, path: str, batch_size: int = 1,
                          progress: bool = True, *, refine: int = 0,
                          refine_learning_rate: float = DEFAULT_LEARNING_RATE,
                          fingerprints: dict | None = None) -> int:
    """Run ``teacher`` on every pair whose flow is not stored yet; return how many ran.

    ``refine > 0`` stores each flow after that many instance-optimisation steps
    (:func:`aldk_tf.training.refine.refine_flow`, smoothness weight 1 on the increment). Raises
    :class:`RunError` when ``path`` holds flows made with a different setting.
    ``fingerprints`` (:func:`provenance`, computed when not given) are recorded on the
    file; a file made by another teacher or from other data is set aside first.
    """
    from aldk_tf.data import load_pair

    setting = refine_setting(refine, refine_learning_rate)
    check_flow_file(path, refine, refine_learning_rate)
    if fingerprints is None:
        fingerprints = provenance(teacher, dataset_config, pairs)
    set_aside_if_stale(path, fingerprints)
    todo = missing_pairs(path, pairs)
    if not todo:
        return 0
    register = tf.function(teacher.registration_model(), reduce_retracing=True)
    bar = keras.utils.Progbar(len(todo), unit_name="pair",
                              verbose=1 if sys.stderr.isatty() else 2) if progress else None
    with _open(path) as handle:
        check_setting(path, handle, setting)
        handle.attrs.update(setting)
        handle.attrs["teacher_sha256"] = fingerprints["teacher_sha256"]
        handle.attrs["teacher_rep"] = fingerprints.get("teacher_rep", teacher_rep(teacher))
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            loaded = [load_pair(dataset_config, f, m) for f, m in chunk]
            inputs = {key: np.stack([p[key] for p in loaded]).astype(np.float32)
                      for key in ("fixed", "moving")}
            teacher_flows = register(inputs)["flow"]                   # [B, D, H, W, 3]
            flows = teacher_flows
            if refine:
                flows, _ = refine_flow(inputs["fixed"], inputs["moving"], teacher_flows,
                                       refine, learning_rate=refine_learning_rate)
            flows = flows.numpy().astype(np.float16)
            scores = _target_scores(loaded, teacher_flows.numpy(), flows,
                                    dataset_config.label_values)
            for (fixed_id, moving_id), flow, score in zip(chunk, flows, scores):
                scans = fingerprints["scans"]
                origin = {"fixed_id": fixed_id, "moving_id": moving_id,
                          "fixed_sha256": scans[fixed_id],
                          "moving_sha256": scans[moving_id]}
                _write_flow(handle, pair_key(fixed_id, moving_id), flow,
                            {**setting, **score, **origin})
            handle.flush()
            if bar is not None:
                bar.add(len(chunk))
    summary = refinement_summary(path, [pair_key(*pair) for pair in todo])
    if summary["pairs"]:
        log.info("%s: Dice of the %d new targets with segmentations: teacher %.4f, "
                 "stored %.4f", path, summary["pairs"], summary["dice_teacher"],
                 summary["dice_stored"])
    return len(todo)


def _target_scores(loaded, teacher_flows, stored_flows, label_values) -> list[dict]:
    """Per pair: Dice and % folding of the raw teacher flow and of the stored (float16,
    maybe refined) flow, for pairs with both segmentations; ``{}`` for the others."""
    scores: list[dict] = [{} for _ in loaded]
    scored = [i for i, pair in enumerate(loaded)
              if pair["fixed_seg"].any() and pair["moving_seg"].any()]
    if not scored:
        return scores
    fixed_seg = np.stack([loaded[i]["fixed_seg"] for i in scored])
    moving_seg = np.stack([loaded[i]["moving_seg"] for i in scored])
    for name, flows in (("teacher", teacher_flows), ("stored", stored_flows)):
        result = metrics.pair_metrics(fixed_seg, moving_seg,
                                      flows[scored].astype(np.float32), label_values)
        for row, index in enumerate(scored):
            scores[index][f"dice_{name}"] = float(result["dice"][row])
            scores[index][f"folding_{name}"] = float(result["folding_percent"][row])
    return scores


def refinement_summary(path: str, keys=None) -> dict:
    """Mean Dice of the raw teacher flows and of the stored targets over the flows of
    ``path`` (those of ``keys``, or all) that have scores (segmented pairs):
    ``{"pairs", "refine_steps", "dice_teacher", "dice_stored", "folding_teacher",
    "folding_stored"}`` (NaN means when no pair has a segmentation)."""
    names = ("dice_teacher", "dice_stored", "folding_teacher", "folding_stored")
    values: dict[str, list[float]] = {name: [] for name in names}
    with h5py.File(path, "r") as handle:
        setting = stored_setting(handle)
        complete = _complete_keys(handle)
        for key in sorted(complete if keys is None else set(keys) & complete):
            attrs = handle[key].attrs
            if all(name in attrs for name in names):
                for name in names:
                    values[name].append(float(attrs[name]))
    summary: dict = {"pairs": len(values["dice_teacher"]), **setting}
    for name in names:
        summary[name] = float(np.mean(values[name])) if values[name] else float("nan")
    return summary


def _write_flow(handle: h5py.File, key: str, flow: np.ndarray, attrs=None) -> None:
    if key in handle:
        del handle[key]
    dataset = handle.create_dataset(key, data=flow)
    dataset.attrs.update(dict(attrs or {}))
    dataset.attrs["complete"] = True                # last: a cut-off write is redone


def merge_teacher_flows(path: str, parts: list[str]) -> int:
    """Copy the complete flows of the shard files ``parts`` (all of 1/n .. n/n) into the
    flow file ``path``; flows it already holds are kept. Returns how many were copied.

    All parts, and ``path`` if it holds flows, must share one refine setting."""
    check_complete([_part_shard(part) for part in parts], path)
    setting, first = None, None
    for part in parts:
        with h5py.File(part, "r") as source:
            if not _complete_keys(source):
                continue
            if setting is not None and stored_setting(source) != setting:
                raise RunError(f"{part}: flows stored with "
                               f"{_describe(stored_setting(source))}, {first}'s with "
                               f"{_describe(setting)}; extract all shards with one setting")
            setting, first = stored_setting(source), part
    fingerprints = _shared_fingerprints(parts)
    copied = 0
    with _open(path) as out:
        if setting is not None:
            check_setting(path, out, setting)
            out.attrs.update(setting)
        if fingerprints and _complete_keys(out):
            for key, value in fingerprints.items():
                if out.attrs.get(key) != value:
                    raise RunError(f"{path}: holds flows of another teacher or other data "
                                   f"than the shard parts ({key}); move it away first")
        out.attrs.update(fingerprints)
        done = _complete_keys(out)
        for part in parts:
            with h5py.File(part, "r") as source:
                for key in sorted(_complete_keys(source) - done):
                    _write_flow(out, key, source[key][()], source[key].attrs)
                    done.add(key)
                    copied += 1
            out.flush()
    return copied


def _shared_fingerprints(parts: list[str]) -> dict:
    """The teacher/data fingerprints all ``parts`` share (RunError if they differ)."""
    found: dict = {}
    for part in parts:
        with h5py.File(part, "r") as source:
            if not _complete_keys(source):
                continue
            for key in ("teacher_sha256",):
                value = source.attrs.get(key)
                if value is None:
                    continue
                if found.setdefault(key, value) != value:
                    raise RunError(f"{part}: flows of another teacher or other data than "
                                   f"the other parts ({key}); extract all shards again")
    return found


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
        #: How the stored flows were refined: ``{"refine_steps": N, ...}``.
        self.setting = stored_setting(self.handle)

    def read(self, fixed_id: str, moving_id: str) -> np.ndarray:
        key = pair_key(fixed_id, moving_id)
        if key not in self.handle:
            raise RunError(f"{self.path}: no teacher flow for pair {key}")
        return np.asarray(self.handle[key], dtype=np.float32)

    def close(self) -> None:
        self.handle.close()


def main(argv=None) -> int:
    """``python -m aldk_tf.training.teacher_flows``: extract (a shard of) the teacher flows, or
    merge the shards; one-line errors, exit code 2."""
    parser = argparse.ArgumentParser(
        description="Store a teacher's final flows of every training pair (for ALDK).")
    parser.add_argument("-c", "--checkpoint", "--teacher", dest="checkpoint", required=True,
                        help="teacher run directory, weights/<run> (--teacher: old name)")
    parser.add_argument("-d", "--dataset", help="dataset JSON whose training pairs to "
                        "extract (default: the teacher run's)")
    parser.add_argument("--shard", help="extract only shard i/n of the pairs (1-based, "
                        "every n-th pair) into teacher_flows.shard-i-of-n.h5")
    parser.add_argument("--merge", action="store_true", help="merge the shard files into "
                        "teacher_flows.h5 (then removed unless --keep-parts)")
    parser.add_argument("--keep-parts", "--keep_parts", action="store_true")
    parser.add_argument("--batch", type=int, default=1, help="pairs per teacher call")
    parser.add_argument("--teacher-rep", "--teacher_rep", dest="teacher_rep", type=int,
                        default=0, help="apply the teacher's cascades R times with shared "
                        "weights (RCN's test-time recursion; default: as trained)")
    add_refine_arguments(parser, "store each teacher flow refined by")
    args = parser.parse_args(argv)
    from aldk_tf.training import runs
    from aldk_tf.data import TRAINING_SCHEME, DataError, list_pairs, load_dataset_config
    try:
        if args.merge and args.shard:
            raise ShardError("--merge and --shard exclude each other")
        shard = Shard.parse(args.shard) if args.shard else None
        if args.batch < 1:
            raise RunError(f"--batch: expected an integer >= 1, got {args.batch}")
        refine_setting(args.refine, args.refine_lr)          # a bad value fails first
        if not 0 <= args.teacher_rep <= MAX_REP:
            raise RunError(f"--teacher-rep: expected R in 0..{MAX_REP}, got "
                           f"{args.teacher_rep}")
        teacher_config = runs.load_run_config(args.checkpoint)
        rep = args.teacher_rep or teacher_config.model.rep
        dataset_config = load_dataset_config(args.dataset or teacher_config.dataset)
        pairs = list_pairs(dataset_config, TRAINING_SCHEME)
        path = flows_path(args.checkpoint, refine=args.refine, rep=rep)
        if args.merge:
            parts = find_parts(args.checkpoint, *flows_stem(args.refine, rep))
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
            raise RunError(f"{args.checkpoint}: teacher image size "
                           f"{tuple(teacher_config.model.image_size)} differs from "
                           f"{dataset_config.where}'s {tuple(dataset_config.image_size)}")
        check_flow_file(path, args.refine, args.refine_lr)
        _, teacher = runs.load_model(args.checkpoint, rep=rep)
        fingerprints = provenance(teacher, dataset_config, pairs)   # all training pairs
        reason = set_aside_if_stale(path, fingerprints)
        if reason is not None:
            print(f"{path}: {reason}; moved to {path}.stale", file=sys.stderr)
        if shard is not None:
            done = stored_keys(path)
            pairs = [pair for pair in shard.select(pairs) if pair_key(*pair) not in done]
            path = flows_path(args.checkpoint, shard, args.refine, rep)
            _open(path).close()               # exists even when it has nothing to do
        count = extract_teacher_flows(teacher, dataset_config, pairs, path, args.batch,
                                      refine=args.refine,
                                      refine_learning_rate=args.refine_lr,
                                      fingerprints=fingerprints)
        print(f"{count} flows extracted into {path}")
        if os.path.exists(path):
            summary = refinement_summary(path, [pair_key(*pair) for pair in pairs])
            print(json.dumps({key: None if isinstance(value, float) and np.isnan(value)
                              else value for key, value in summary.items()}))
        return 0
    except (RunError, DataError, ShardError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
