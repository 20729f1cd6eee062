"""Teacher-flow extraction: the frozen teacher's final aggregate flow per training pair.

Stored once, float16, in ``weights/<teacher run>/teacher_flows.h5`` under the release's
key ``"<fixed id>-<moving id>"`` (ids are ``prefix/scan``, so the key is an HDF5 path),
and reused by every later student run. Extraction shows progress and resumes: a pair is
written with a ``complete`` attribute last, so a pair cut off by a kill is redone.

Extraction can be split across machines: shard ``i/n`` (:mod:`aldk_tf.shards`) writes
``teacher_flows.shard-i-of-n.h5`` beside the teacher, and a merge copies the parts into
``teacher_flows.h5``, which then holds exactly what an unsharded extraction writes::

    aldk-teacher-flows -c weights/<run> -d data.json --shard 2/3
    aldk-teacher-flows -c weights/<run> -d data.json --merge

With ``refine=N`` (``--refine N``) each teacher flow is refined by N steps of instance
optimisation (:mod:`aldk_tf.training.refine`) before it is stored, so the targets are better than
the teacher itself. The file and every flow record the setting (attributes
``refine_steps`` and ``refine_learning_rate``); a file written with another setting is
refused, never mixed or silently reused; each setting has its own file
(``teacher_flows-refine<N>.h5``). Pairs with segmentations also record the Dice
(and % folding voxels) of the raw teacher flow and of the stored one
(``dice_teacher``/``dice_stored``, ``folding_teacher``/``folding_stored``), which
:func:`aldk_tf.training.flow_store.refinement_summary` averages. The file itself:
:mod:`aldk_tf.training.flow_store`.
"""

from __future__ import annotations

import logging
import sys

import keras
import numpy as np
import tensorflow as tf

from aldk_tf import metrics
from aldk_tf.training.flow_store import (check_flow_file, check_setting, missing_pairs,
                                         open_flow_file, pair_key, provenance,
                                         refine_setting, refinement_summary,
                                         set_aside_if_stale, teacher_rep, write_flow)
from aldk_tf.training.refine import DEFAULT_LEARNING_RATE, refine_flow

log = logging.getLogger(__name__)


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
    with open_flow_file(path) as handle:
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
                write_flow(handle, pair_key(fixed_id, moving_id), flow,
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
