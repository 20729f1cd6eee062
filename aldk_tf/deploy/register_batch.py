"""Batch registration from a pairs CSV: ``aldk-register --pairs pairs.csv --out DIR``.

The CSV has a header row and one row per pair; columns ``fixed`` and ``moving`` (NIfTI
paths) are required, ``moving_seg``, ``fixed_mask``, ``moving_mask`` and ``name`` are
optional (an empty cell = none). Relative paths are taken from the CSV's folder. Every
pair is written to ``DIR/<name>/`` (default name ``<fixed id>__<moving id>``, the file
names without their NIfTI suffix) exactly as a single ``register`` call would write it,
and ``DIR/summary.csv`` lists every pair with its status (``ok`` or the one-line error),
seconds, % folding and std det(J).

The model is loaded once. The whole CSV is checked before any registration (files exist,
names unique, output folders free unless ``--overwrite``, masks given for all pairs or
none); a pair that fails while registering (e.g. a scan the model's preprocessing cannot
prepare) is reported in the summary and the others go on; the exit status is then 1.
"""

from __future__ import annotations

import csv
import io
import os

from aldk_tf.config import atomic_write_text
from aldk_tf.data import DataError

COLUMNS = ("fixed", "moving", "moving_seg", "fixed_mask", "moving_mask", "name")
SUMMARY_NAME = "summary.csv"
SUMMARY_COLUMNS = ("name", "fixed", "moving", "status", "seconds", "folding_percent",
                   "jacobian_det_std", "out_dir")


class PairsError(ValueError):
    """A pairs CSV that cannot be used (one-line message naming the file and row)."""


def scan_id(path: str) -> str:
    name = os.path.basename(path)
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[:-len(suffix)]
    return os.path.splitext(name)[0]


def read_pairs(path: str) -> list[dict]:
    """The rows of a pairs CSV, paths resolved, names set; :class:`PairsError` if bad."""
    if not os.path.isfile(path):
        raise PairsError(f"{path}: pairs CSV not found")
    try:
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            header = reader.fieldnames or []
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise PairsError(f"{path}: not a readable CSV ({error})") from None
    missing = [column for column in ("fixed", "moving") if column not in header]
    unknown = [column for column in header if column not in COLUMNS]
    if missing or unknown:
        raise PairsError(f"{path}: header {header}: expected columns fixed, moving and "
                         f"optionally {', '.join(COLUMNS[2:])}"
                         + (f" (unknown: {', '.join(map(str, unknown))})" if unknown else ""))
    if not rows:
        raise PairsError(f"{path}: no pairs (only a header)")
    folder = os.path.dirname(os.path.abspath(path))
    pairs, names = [], set()
    for line, row in enumerate(rows, start=2):
        pair = {}
        for column in COLUMNS[:5]:
            value = (row.get(column) or "").strip()
            if not value:
                if column in ("fixed", "moving"):
                    raise PairsError(f"{path}: line {line}: empty '{column}'")
                pair[column] = None
                continue
            value = value if os.path.isabs(value) else os.path.join(folder, value)
            if not os.path.isfile(value):
                raise PairsError(f"{path}: line {line}: {column} file {value} not found")
            pair[column] = value
        name = (row.get("name") or "").strip() or \
            f"{scan_id(pair['fixed'])}__{scan_id(pair['moving'])}"
        if os.sep in name or name in (".", "..") or name.startswith("."):
            raise PairsError(f"{path}: line {line}: name '{name}' must be a plain folder "
                             "name")
        if name in names:
            raise PairsError(f"{path}: line {line}: output name '{name}' used twice (add "
                             "a 'name' column)")
        names.add(name)
        if (pair["fixed_mask"] is None) != (pair["moving_mask"] is None):
            raise PairsError(f"{path}: line {line}: fixed_mask and moving_mask go together")
        pairs.append({**pair, "name": name, "line": line})
    masks = {pair["fixed_mask"] is not None or pair["moving_mask"] is not None
             for pair in pairs}
    if len(masks) > 1:
        raise PairsError(f"{path}: masks are given for some pairs only; give "
                         "fixed_mask and moving_mask for every pair or for none")
    return pairs


def register_batch(model: str, pairs_csv: str, out_dir: str, overrides: dict | None = None,
                   refine: int = 0, refine_learning_rate: float | None = None,
                   flow_space: str = "ras", overwrite: bool = False,
                   progress: bool = True) -> list[dict]:
    """Register every pair of ``pairs_csv`` into ``out_dir/<name>/``; returns the summary
    rows (also written to ``out_dir/summary.csv``)."""
    from aldk_tf.deploy import register

    pairs = read_pairs(pairs_csv)
    with_masks = pairs[0]["fixed_mask"] is not None or pairs[0]["moving_mask"] is not None
    for pair in pairs:
        register.check_output_dir(os.path.join(out_dir, pair["name"]), overwrite)
    options = {} if refine_learning_rate is None else \
        {"refine_learning_rate": refine_learning_rate}
    registrar = register.Registrar(model, overrides, with_masks=with_masks, refine=refine,
                                   **options)
    bar = None
    if progress:
        import keras
        bar = keras.utils.Progbar(len(pairs), unit_name="pair")
    rows = []
    for pair in pairs:
        target = os.path.join(out_dir, pair["name"])
        row = {"name": pair["name"], "fixed": pair["fixed"], "moving": pair["moving"],
               "status": "ok", "seconds": "", "folding_percent": "",
               "jacobian_det_std": "", "out_dir": target}
        try:
            result = registrar.register(pair["fixed"], pair["moving"], pair["fixed_mask"],
                                        pair["moving_mask"], pair["moving_seg"],
                                        flow_space)
            register.write_registration(result, target, overwrite, extra={
                "model": os.path.abspath(registrar.model_path),
                "fixed": pair["fixed"], "moving": pair["moving"]})
            row.update(seconds=f"{result.stats['seconds']:.4f}",
                       folding_percent=f"{result.stats['folding_percent']:.4f}",
                       jacobian_det_std=f"{result.stats['jacobian_det_std']:.4f}")
        except (register.RegisterError, DataError) as error:
            row.update(status=f"error: {error}", out_dir="")
        rows.append(row)
        if bar is not None:
            bar.add(1)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(os.path.join(out_dir, SUMMARY_NAME), text.getvalue())
    return rows

