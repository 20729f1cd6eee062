"""Evaluation reports: summaries, the RCN text report, the per-label CSV, the JSON report,
and the merge of sharded reports.

The text report keeps the original evaluation script's format: one line per pair
``id1 id2 dice jacc landmark_distance jacobian_det_std``, a line ``Summary``, then
``Dice score: <mean> (<std>)`` and the same for ``Jacc score``, ``Landmark distance`` and
``Jacobian determinant`` (std over pairs). NaN entries (a pair without segmentation or
landmarks) are left out of the summary means. The records come from
:func:`aldk_tf.evaluation.evaluate_pairs`.
"""

from __future__ import annotations

import json

import numpy as np

from aldk_tf.config import atomic_write_text
from aldk_tf.data import DataError


class EvaluationError(ValueError):
    """An evaluation that cannot run (one-line message)."""


#: (record key, report label) of the summary lines, in the original's order.
RCN_SUMMARY = (("dice", "Dice score"), ("jacc", "Jacc score"),
               ("landmark_distance", "Landmark distance"),
               ("jacobian_det_std", "Jacobian determinant"))
#: Per-pair scalars summarised in the JSON report (surface distances when computed).
SCALAR_KEYS = ("dice", "jacc", "landmark_distance", "jacobian_det_std", "folding_percent",
               "seconds", "hd95", "msd", "landmark_distance_mm")
#: Per-label entries of a record: {label name: value}.
LABEL_KEYS = ("dice_labels", "jacc_labels", "hd95_labels", "msd_labels")
#: Scalars of the "before registration" (identity flow) entry of a record.
BEFORE_KEYS = ("dice", "jacc", "landmark_distance", "hd95", "msd", "landmark_distance_mm")
#: Columns of the per-pair x per-label CSV (:func:`write_label_csv`).
CSV_COLUMNS = ("stage", "fixed_id", "moving_id", "label", "dice", "jaccard", "hd95",
               "mean_surface_distance", "distance_unit", "tre_mm", "folding_percent",
               "jacobian_det_std")


def _mean_std(values) -> tuple[float, float]:
    values = np.asarray(values, np.float64)
    values = values[~np.isnan(values)]
    if values.size == 0:
        return float("nan"), float("nan")
    return float(values.mean()), float(values.std())


def summarise(records: list[dict]) -> dict:
    """Mean and std over pairs of every scalar, and the per-label means.

    ``{"pairs": n, "<key>": {"mean", "std"}, "dice_labels": {label: {"mean", "std"}},
    "jacc_labels": ...}``; NaNs (absent segmentation or landmarks) are left out.
    """
    summary: dict = {"pairs": len(records)}
    for key in SCALAR_KEYS:
        if records and key not in records[0]:
            continue                          # surface distances not computed
        mean, std = _mean_std([record.get(key, float("nan")) for record in records])
        summary[key] = {"mean": mean, "std": std}
    for key in LABEL_KEYS:
        if records and key not in records[0]:
            continue
        labels = list(records[0][key]) if records else []
        summary[key] = {}
        for label in labels:
            mean, std = _mean_std([record[key][label] for record in records])
            summary[key][label] = {"mean": mean, "std": std}
    if records and "before" in records[0]:
        summary["before"] = {}
        for key in BEFORE_KEYS:
            if key in records[0]["before"]:
                mean, std = _mean_std([record["before"][key] for record in records])
                summary["before"][key] = {"mean": mean, "std": std}
    return summary


def rcn_report(records: list[dict]) -> str:
    """The text of the RCN evaluation report (see the module docstring)."""
    lines = [f"{r['fixed_id']} {r['moving_id']} {r['dice']} {r['jacc']} "
             f"{r['landmark_distance']} {r['jacobian_det_std']}" for r in records]
    lines.append("Summary")
    summary = summarise(records)
    for key, label in RCN_SUMMARY:
        lines.append(f"{label}: {summary[key]['mean']} ({summary[key]['std']})")
    return "\n".join(lines) + "\n"


def write_rcn_report(path, records: list[dict]) -> None:
    """Write :func:`rcn_report` to ``path`` atomically (temporary file + rename)."""
    atomic_write_text(str(path), rcn_report(records))


def label_rows(records: list[dict]) -> list[dict]:
    """Rows of the per-pair x per-label table: for every pair, one row per label before
    registration (identity flow: no folding, det(J) std 0) when scored, then after.
    ``tre_mm``: the pair's mean landmark distance in mm (the text report's is in voxels),
    empty without landmarks or voxel sizes."""
    rows = []
    for record in records:
        unit = record.get("distance_unit", "")
        stages = ([("before", record["before"], 0.0, 0.0)] if "before" in record else [])
        stages.append(("after", record, record["folding_percent"],
                       record["jacobian_det_std"]))
        for stage, scores, folding, jacobian_std in stages:
            for label in scores["dice_labels"]:
                rows.append({
                    "stage": stage, "fixed_id": record["fixed_id"],
                    "moving_id": record["moving_id"], "label": label,
                    "dice": scores["dice_labels"][label],
                    "jaccard": scores["jacc_labels"][label],
                    "hd95": scores.get("hd95_labels", {}).get(label, float("nan")),
                    "mean_surface_distance": scores.get("msd_labels", {}).get(
                        label, float("nan")),
                    "distance_unit": unit,
                    "tre_mm": scores.get("landmark_distance_mm", float("nan")),
                    "folding_percent": folding,
                    "jacobian_det_std": jacobian_std})
    return rows


def write_label_csv(path, records: list[dict]) -> None:
    """Write :func:`label_rows` as CSV (columns :data:`CSV_COLUMNS`) atomically; NaN is
    written as an empty field."""
    import csv
    import io
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in label_rows(records):
        writer.writerow({key: ("" if isinstance(value, float) and np.isnan(value)
                               else f"{value:.6g}" if isinstance(value, float) else value)
                         for key, value in row.items()})
    atomic_write_text(str(path), text.getvalue())


def write_json_report(path, records: list[dict], summary: dict,
                      **metadata) -> None:
    """Write ``{**metadata, "summary", "pairs"}`` as JSON atomically; NaN -> null."""
    document = _without_nan({**metadata, "summary": summary, "pairs": records})
    atomic_write_text(str(path), json.dumps(document, indent=2) + "\n")


def _without_nan(value):
    if isinstance(value, float):
        return None if np.isnan(value) else value
    if isinstance(value, dict):
        return {key: _without_nan(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_without_nan(item) for item in value]
    return value


def read_json_report(path) -> dict:
    """A report written by :func:`write_json_report`, with the records' NaNs restored."""
    try:
        with open(path) as handle:
            document = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise EvaluationError(f"{path}: not a readable evaluation report ({error})") \
            from None
    if not isinstance(document, dict) or "pairs" not in document:
        raise EvaluationError(f"{path}: not an evaluation report (no 'pairs')")
    document["pairs"] = [_with_nan(record) for record in document["pairs"]]
    return document


def _with_nan(value):
    if value is None:
        return float("nan")
    if isinstance(value, dict):
        return {key: _with_nan(item) for key, item in value.items()}
    return value


# --- sharded evaluation: evaluate.py --shard i/n writes parts, --merge joins them.

def shard_metadata(shard, total_pairs: int) -> dict:
    """What a part's JSON report records about its shard (``shard=`` of the writer)."""
    return {"index": shard.index, "count": shard.count, "pairs": total_pairs}


def merge_json_reports(paths) -> tuple[dict, list[dict]]:
    """``(metadata, records)`` of the unsharded evaluation, from its shard parts' JSON.

    The parts must be exactly shards 1/n .. n/n of one evaluation (same run, data,
    scheme and settings); records come back in the unsharded pair order.
    """
    from aldk_tf.shards import Shard, ShardError, check_complete
    documents = [read_json_report(path) for path in paths]
    for path, document in zip(paths, documents):
        if not isinstance(document.get("shard"), dict):
            raise EvaluationError(f"{path}: not a shard part (no 'shard' entry)")
    shards = [Shard(d["shard"]["index"], d["shard"]["count"]) for d in documents]
    try:
        check_complete(shards, paths[0] if len(paths) == 1 else f"{len(paths)} parts")
    except ShardError as error:
        raise EvaluationError(str(error)) from None

    def settings(document):
        return {key: value for key, value in document.items()
                if key not in ("summary", "pairs", "shard")}

    total = documents[0]["shard"]["pairs"]
    merged: list = [None] * total
    for path, shard, document in zip(paths, shards, documents):
        if settings(document) != settings(documents[0]) or document["shard"]["pairs"] != total:
            raise EvaluationError(f"{path}: a part of a different evaluation than "
                                  f"{paths[0]} (run, data or settings differ)")
        positions = shard.positions(total)
        if len(positions) != len(document["pairs"]):
            raise EvaluationError(f"{path}: {len(document['pairs'])} pairs, expected "
                                  f"{len(positions)} for shard {shard} of {total}")
        for position, record in zip(positions, document["pairs"]):
            merged[position] = record
    return settings(documents[0]), merged


def read_rcn_summary(path) -> dict[str, tuple[float, float]]:
    """``{"Dice score": (mean, std), ...}`` parsed back from a written report."""
    summary, in_summary = {}, False
    with open(path) as handle:
        for line in handle:
            line = line.rstrip("\n")
            if line == "Summary":
                in_summary = True
            elif in_summary and ": " in line:
                label, values = line.split(": ", 1)
                mean, std = values.rstrip(")").split(" (")
                summary[label] = (float(mean), float(std))
    if not in_summary:
        raise DataError(f"{path}: no 'Summary' line; not an RCN evaluation report")
    return summary
