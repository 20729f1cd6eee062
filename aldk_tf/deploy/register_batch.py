"""Batch registration from a pairs CSV: ``aldk-register --pairs pairs.csv --out DIR``.

The CSV has a header row and one row per pair; columns ``fixed`` and ``moving`` (NIfTI
files or DICOM series folders) are required, ``moving_seg``, ``fixed_mask``,
``moving_mask`` and ``name`` are optional (an empty cell = none). Relative paths are taken
from the CSV's folder. Every pair is written to ``DIR/<name>/`` (default name
``<fixed id>__<moving id>``, the names without their NIfTI suffix) exactly as a single
``register`` call would write it, and ``DIR/summary.csv`` lists every row with its status
(``ok`` or the one-line reason), the network's seconds, the pair's wall seconds (reading to
written), % folding and std det(J) on the fixed grid.

Batches finish: every row is checked first (files or folders exist, names unique and
plain, output folder free unless ``--overwrite``, masks in pairs); a bad row is reported
in the summary and skipped, the good rows are registered with the model loaded once, a
pair that fails while registering is reported too, and the exit status is then 1. Only a
CSV that cannot be read at all (no such file, no ``fixed``/``moving`` columns, no rows, or
masks for some pairs only) stops the batch before any work (exit status 2).
"""

from __future__ import annotations

import csv
import io
import os
import sys
import time

from aldk_tf.config import atomic_write_text
from aldk_tf.data import DataError

COLUMNS = ("fixed", "moving", "moving_seg", "fixed_mask", "moving_mask", "name")
SUMMARY_NAME = "summary.csv"
SUMMARY_COLUMNS = ("name", "fixed", "moving", "status", "network_seconds", "wall_seconds",
                   "folding_percent_fixed_grid", "jacobian_det_std_fixed_grid", "out_dir")


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
        pair = {"line": line, "error": None, **dict.fromkeys(COLUMNS[2:5])}
        try:
            for column in COLUMNS[:5]:
                pair[column] = _row_path(row, column, folder, path, line)
        except PairsError as error:
            pair["error"] = str(error)
        for column in ("fixed", "moving"):              # for the summary, even if bad
            pair.setdefault(column, (row.get(column) or "").strip())
        fixed, moving = pair["fixed"] or f"line{line}", pair["moving"] or "?"
        name = (row.get("name") or "").strip() or f"{scan_id(fixed)}__{scan_id(moving)}"
        if os.sep in name or name in (".", "..") or name.startswith("."):
            pair["error"] = pair["error"] or (f"{path}: line {line}: name '{name}' must be "
                                              "a plain folder name")
            name = f"line{line}"
        if name in names:
            pair["error"] = pair["error"] or (f"{path}: line {line}: output name '{name}' "
                                              "used twice (add a 'name' column)")
            name = f"{name}.line{line}"
        names.add(name)
        if pair["error"] is None and \
                (pair["fixed_mask"] is None) != (pair["moving_mask"] is None):
            pair["error"] = f"{path}: line {line}: fixed_mask and moving_mask go together"
        pairs.append({**pair, "name": name})
    masks = {pair["fixed_mask"] is not None or pair["moving_mask"] is not None
             for pair in pairs if pair["error"] is None}
    if len(masks) > 1:
        raise PairsError(f"{path}: masks are given for some pairs only; give "
                         "fixed_mask and moving_mask for every pair or for none")
    return pairs


def _row_path(row: dict, column: str, folder: str, path: str, line: int):
    """The resolved path of one cell (None if empty and optional); :class:`PairsError`
    if a required cell is empty or the file (or DICOM folder) does not exist."""
    value = (row.get(column) or "").strip()
    if not value:
        if column in ("fixed", "moving"):
            raise PairsError(f"{path}: line {line}: empty '{column}'")
        return None
    value = value if os.path.isabs(value) else os.path.join(folder, value)
    if not os.path.exists(value):
        raise PairsError(f"{path}: line {line}: {column} {value} not found (expected a "
                         "NIfTI file or a DICOM series folder)")
    return value


def register_batch(model: str, pairs_csv: str, out_dir: str, overrides: dict | None = None,
                   refine: int = 0, refine_learning_rate: float | None = None,
                   flow_space: str = "lps", overwrite: bool = False,
                   progress: bool = True, jacobian: bool = False,
                   preview: bool = False, stream=None, refine_grid: int | None = None
                   ) -> list[dict]:
    """Register every good row of ``pairs_csv`` into ``out_dir/<name>/``; returns the
    summary rows of all rows (also written to ``out_dir/summary.csv``)."""
    from aldk_tf.console import Progress
    from aldk_tf.deploy import register

    pairs = read_pairs(pairs_csv)
    for pair in pairs:
        if pair["error"] is None:
            try:
                register.check_output_dir(os.path.join(out_dir, pair["name"]), overwrite)
            except register.RegisterError as error:
                pair["error"] = str(error)
    good = [pair for pair in pairs if pair["error"] is None]
    with_masks = bool(good) and (good[0]["fixed_mask"] is not None)
    options = {} if refine_learning_rate is None else \
        {"refine_learning_rate": refine_learning_rate}
    if refine_grid is not None:
        options["refine_grid"] = refine_grid
    registrar = register.Registrar(model, overrides, with_masks=with_masks, refine=refine,
                                   **options) if good else None
    bar = Progress(len(pairs), "pairs", stream or sys.stdout) if progress else None
    rows = []
    for pair in pairs:
        target = os.path.join(out_dir, pair["name"])
        row = {"name": pair["name"], "fixed": pair["fixed"], "moving": pair["moving"],
               "status": "ok", "network_seconds": "", "wall_seconds": "",
               "folding_percent_fixed_grid": "", "jacobian_det_std_fixed_grid": "",
               "out_dir": target}
        started = time.perf_counter()
        try:
            if pair["error"] is not None:
                raise register.RegisterError(pair["error"])
            result = registrar.register(pair["fixed"], pair["moving"], pair["fixed_mask"],
                                        pair["moving_mask"], pair["moving_seg"],
                                        flow_space)
            register.write_registration(result, target, overwrite, extra={
                "model": os.path.abspath(registrar.model_path),
                "fixed": pair["fixed"], "moving": pair["moving"]},
                jacobian=jacobian, preview=preview)
            stats = result.stats
            row.update(network_seconds=f"{stats['network_seconds']:.4f}",
                       wall_seconds=f"{time.perf_counter() - started:.4f}",
                       folding_percent_fixed_grid=f"{stats['folding_percent_fixed_grid']:.4f}",
                       jacobian_det_std_fixed_grid=f"{stats['jacobian_det_std_fixed_grid']:.4f}")
        except (register.RegisterError, DataError) as error:
            row.update(status=f"error: {error}", out_dir="")
        rows.append(row)
        if bar is not None:
            bar.step(f"{pair['name']}: {row['status']}")
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=SUMMARY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_text(os.path.join(out_dir, SUMMARY_NAME), text.getvalue())
    return rows
