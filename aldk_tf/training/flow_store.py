"""The teacher-flow file: one float16 flow per training pair, with its provenance.

``weights/<teacher run>/teacher_flows.h5`` (``teacher_flows-refine<N>.h5`` for refined
targets; ``.shard-i-of-n.h5`` parts when extraction is sharded) holds the flow of pair
``(fixed, moving)`` under the release's key ``"<fixed id>-<moving id>"``. A flow is
written with a ``complete`` attribute last (a write cut off by a kill is redone); the file
records the refine setting and the teacher's fingerprint, every flow the fingerprints of
its two scans, so a file made by another teacher, from other data or with another setting
is refused or set aside, never mixed. Extraction: :mod:`aldk_tf.training.teacher_flows`.
"""

from __future__ import annotations

import hashlib
import logging
import os

import h5py
import numpy as np

from aldk_tf.shards import Shard, ShardError, check_complete, split_name
from aldk_tf.refine_options import DEFAULT_LEARNING_RATE
from aldk_tf.refine_options import check_arguments as check_refine_arguments
from aldk_tf.training.runs import TEACHER_FLOWS_NAME, RunError

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


def open_flow_file(path: str) -> h5py.File:
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
        handle = open_flow_file(path)                # unreadable: set aside, or in use: an error
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


def write_flow(handle: h5py.File, key: str, flow: np.ndarray, attrs=None) -> None:
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
    with open_flow_file(path) as out:
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
                    write_flow(out, key, source[key][()], source[key].attrs)
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
