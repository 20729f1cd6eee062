"""Evaluate a trained run on the validation scheme or on named subsets (RCN format).

    python evaluate.py -c weights/<run> [-d dataset.json] [-v subset[,subset]] [--batch B]
                       [-r rep] [--paired] [--refine N] [--out evaluate]
    python evaluate.py --exported export/<name>/<N> [-d dataset.json] [-v ...]

writes ``evaluate/<run>[-rep<r>][-refine<N>][-<subset>].txt`` (one line per pair
``id1 id2 dice jacc landmark_distance jacobian_det_std``, then ``Summary`` and the mean
(std) lines), a ``.json`` beside it with per-label Dice/Jaccard/HD95/mean surface
distance, % folding voxels, seconds per pair and the scores before registration, and a
``.csv`` with one row per pair x label and stage (``before`` = identity flow, ``after``):
Dice, Jaccard, HD95 and mean surface distance (mm when the scans carry their affine,
else voxels), % folding and std det(J). Without ``-v`` the dataset's validation scheme
("2") is evaluated. ``--exported`` alone (no ``-c``) evaluates a SavedModel or TFLite
file without the run directory: the dataset is ``-d`` or the one named in the export's
``export_info.json``; reports are named after the export (``<name>-v<N>``).
``--refine N`` refines each flow by N steps of instance optimisation from the model's
(:mod:`aldk_tf.training.refine`) before scoring; the seconds per pair then include it.
``--refine-grid F`` scores a dataset F times finer than the model: the model sees the
pairs downsampled by F, its flow is upsampled and refined on the dataset's grid
(reports ``...-refine<N>-grid<F>``).

Sharded across machines: ``--shard i/n`` (1-based) evaluates every n-th pair starting at
pair i and writes ``<report>.shard-i-of-n.txt/.json``; then, with all parts in one folder,

    python evaluate.py -c weights/<run> [-v ...] --merge        # finds the parts
    python evaluate.py --merge evaluate/<report>.shard-*-of-*.json

writes the report an unsharded run would have written (pairs in the same order).

Installed, the same tool is the console script ``aldk-evaluate``. Parsing the flags
imports no TensorFlow (``--help`` answers at once); its start-up log lines are hidden
unless ``--verbose``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys

from aldk_tf.training import runs
from aldk_tf.config import MAX_REP
from aldk_tf.data import VALIDATION_SCHEME, DataError, load_dataset_config
from aldk_tf.evaluation import EvaluationError
from aldk_tf.reports import write_json_report, write_label_csv, write_rcn_report
from aldk_tf.refine_options import add_arguments as add_refine_arguments
from aldk_tf.refine_options import check_arguments as check_refine_arguments
from aldk_tf.deploy.export_layout import ExportError, prepare_base, remove_if_new_and_empty
from aldk_tf.shards import Shard, ShardError, find_parts, split_name


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--checkpoint", help="run directory weights/<run> (holds "
                        "config.json and model.weights.h5); required unless --exported or "
                        "--merge is given part files")
    parser.add_argument("-d", "--dataset", help="dataset JSON (default: the run's)")
    parser.add_argument("-v", "--val-subset", "--val_subset", help="scheme or subset "
                        "name(s), comma separated (default: the validation scheme)")
    parser.add_argument("--batch", type=int, default=1, help="pairs per model call")
    parser.add_argument("-r", "--rep", type=int, help="shared-weight repetitions of each "
                        "cascade (default: the run's)")
    parser.add_argument("--paired", action="store_true", help="pair adjacent entries "
                        "(both directions) instead of all ordered pairs")
    parser.add_argument("--exported", help="evaluate an exported form instead of the "
                        "run's Keras model: a SavedModel version directory or a .tflite "
                        "file (from export.py)")
    parser.add_argument("--name", help="suffix of the report names (default: the "
                        "exported file's name with --exported)")
    add_refine_arguments(parser, "refine each model flow by")
    parser.add_argument("--refine-grid", "--refine_grid", type=int, default=1, metavar="F",
                        help="score on a dataset F times finer than the model (e.g. a "
                             "64^3 model on 128^3 data): the model registers the pairs "
                             "downsampled by F, its flow is upsampled and refined there by "
                             "--refine N steps (step size x F, as aldk-register does); "
                             "default 1: the model's own grid")
    parser.add_argument("--out", "--out-dir", "--out_dir", default="evaluate",
                        help="report folder (default evaluate)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-surface", action="store_true", help="skip HD95 and mean "
                        "surface distance (faster)")
    parser.add_argument("--shard", help="evaluate only shard i/n of the pairs (1-based, "
                        "every n-th pair) into <report>.shard-i-of-n.txt/.json")
    parser.add_argument("--merge", nargs="*", metavar="PART", help="merge shard parts "
                        "into the unsharded report: the parts' .json files, or none to "
                        "find them in --out by the report name of -c/-v/-r/--name")
    parser.add_argument("--verbose", action="store_true", help="show TensorFlow's log "
                        "lines")
    return parser.parse_args(argv)


def report_stem(run_dir: str, rep: int | None, subset: str | None,
                name: str | None = None, refine: int = 0, grid: int = 1) -> str:
    """``<run>[-rep<r>][-<name>][-refine<N>][-grid<F>][-<subset>]`` as the original
    named its reports (plus the refinement's steps and grid)."""
    stem = os.path.basename(os.path.normpath(run_dir))
    if rep is not None and rep > 1:
        stem += f"-rep{rep}"
    if name:
        stem += f"-{name}"
    if refine:
        stem += f"-refine{refine}"
    if grid > 1:
        stem += f"-grid{grid}"
    return stem if subset is None else f"{stem}-{subset}"


def exported_model(path: str, dataset):
    """(callable ``(fixed, moving) -> {"flow", ...}``, default report name, identity).

    The identity describes the exported model itself, not the run given with ``-c``:
    ``{"exported", "weights_sha256", "export_info"}`` (``export_info.json`` of its
    version directory, ``{}`` if there is none).
    """
    from aldk_tf.deploy import serving
    from aldk_tf.evaluation import check_image_size
    if path.endswith(".tflite") and os.path.isfile(path):
        load, name = serving.tflite_runner, os.path.basename(path)[:-7]
        version_dir, kind = os.path.dirname(os.path.dirname(os.path.abspath(path))), \
            "a TFLite model"
    elif os.path.isfile(os.path.join(path, "saved_model.pb")):
        load, name = serving.savedmodel_runner, "savedmodel"
        version_dir, kind = path, "a SavedModel"
    else:
        raise EvaluationError(f"{path}: --exported needs a .tflite file or a SavedModel "
                              "version directory (export/<name>/<N>)")
    try:
        runner = load(path)
    except Exception as error:        # TF and TFLite raise many types for a bad file
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise EvaluationError(f"{path}: not {kind} that loads ({reason[:200]}); expected "
                              "the output of export.py") from None
    check_image_size(runner.image_size, dataset)
    identity = {"exported": path, "weights_sha256": fingerprint(path),
                "export_info": _export_info(version_dir)}
    return runner, name, identity


def _export_info(version_dir: str) -> dict:
    """The version directory's ``export_info.json`` ({} when absent), read as ``register``
    reads it; an unreadable one is an :class:`EvaluationError`."""
    from aldk_tf.deploy.register import RegisterError, read_export_info
    try:
        return read_export_info(version_dir)
    except RegisterError as error:
        raise EvaluationError(str(error)) from None


def fingerprint(path: str) -> str:
    """SHA-256 of a weights file, or of every file under a directory (names and bytes):
    what the scores of a report belong to."""
    digest = hashlib.sha256()
    files = ([path] if os.path.isfile(path) else
             sorted(os.path.join(root, name) for root, _, names in os.walk(path)
                    for name in names))
    for file in files:
        digest.update(os.path.relpath(file, path).encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def report_run(args) -> str:
    """The run a report is named after: the exported model's source run with ``-c`` and
    ``--exported`` (from its export_info.json; the export's path if it has none), the
    export's ``<name>-v<N>`` for an exported model alone, else ``-c``."""
    if args.exported and not args.checkpoint:       # an exported model alone
        return args.report_base
    if args.exported:
        version_dir = (os.path.dirname(os.path.dirname(os.path.abspath(args.exported)))
                       if args.exported.endswith(".tflite") else args.exported)
        return _export_info(version_dir).get("run") or args.exported
    return args.checkpoint


def export_source(path: str) -> tuple[str, dict, str]:
    """``(version directory or .tflite path, export_info.json, report base name)`` of an
    exported model given alone; the base name is ``<name>-v<N>`` of ``export/<name>/<N>``."""
    from aldk_tf.deploy.register import latest_version
    path = latest_version(os.path.normpath(path))
    if path.endswith(".tflite") and os.path.isfile(path):
        version_dir = os.path.dirname(os.path.dirname(path))
    elif os.path.isfile(os.path.join(path, "saved_model.pb")):
        version_dir = path
    else:
        raise EvaluationError(f"{path}: --exported needs a .tflite file or a SavedModel "
                              "version directory (export/<name>/<N>)")
    info = _export_info(version_dir)
    version = os.path.basename(os.path.abspath(version_dir))
    name = os.path.basename(os.path.dirname(os.path.abspath(version_dir)))
    return path, info, f"{name}-v{version}" if version.isdigit() else version


def main(argv=None) -> int:
    args = parse_args(argv)
    from aldk_tf.console import import_tensorflow
    import_tensorflow(args.verbose)
    existed = os.path.isdir(args.out)
    try:
        if args.merge and args.shard:
            raise EvaluationError("--merge and --shard exclude each other")
        if args.merge:                       # part files named: no run needed
            prepare_base(args.out)
            return _merge(args, {None: args.merge})
        if not args.checkpoint and not args.exported:
            raise EvaluationError("-c/--checkpoint is required (or --exported MODEL, or "
                                  "--merge PART.json ...)")
        if args.name is not None and (not args.name or os.sep in args.name
                                      or args.name in (".", "..")):
            raise EvaluationError(f"--name: expected a report name suffix without "
                                  f"'{os.sep}', got '{args.name}'")
        shard = Shard.parse(args.shard) if args.shard else None
        run_config, info = None, {}
        if args.checkpoint:
            run_config = runs.load_run_config(args.checkpoint)
            dataset_path = args.dataset or run_config.dataset
            if not dataset_path:
                raise EvaluationError(f"{args.checkpoint}: the run names no dataset; "
                                      "pass -d")
        else:
            args.exported, info, args.report_base = export_source(args.exported)
            dataset_path = args.dataset or info.get("dataset")
            if not dataset_path:
                raise EvaluationError(f"{args.exported}: its export_info.json names no "
                                      "dataset; pass -d")
        dataset = load_dataset_config(dataset_path)
        subsets = ([name.strip() for name in args.val_subset.split(",") if name.strip()]
                   if args.val_subset else [None])
        for subset in subsets:               # unknown names fail before any work
            dataset.scheme_subsets(VALIDATION_SCHEME if subset is None else subset)
        if args.rep is not None and not 1 <= args.rep <= MAX_REP:
            raise EvaluationError(f"-r: expected an integer in 1..{MAX_REP}, got {args.rep}")
        if args.rep is not None and (args.exported or not args.checkpoint):
            raise EvaluationError("-r applies to the run's Keras model (-c without "
                                  "--exported); expected no -r with an exported model: "
                                  "its repetitions are built in")
        if args.batch < 1:
            raise EvaluationError(f"--batch must be >= 1, got {args.batch}")
        try:
            check_refine_arguments(args.refine, args.refine_lr)
        except ValueError as error:
            raise EvaluationError(str(error)) from None
        from aldk_tf.evaluation import check_image_size
        if args.refine_grid < 1:
            raise EvaluationError(f"--refine-grid: expected an integer >= 1, got "
                                  f"{args.refine_grid}")
        if args.refine_grid > 1 and (args.exported or run_config is None):
            raise EvaluationError("--refine-grid applies to the run's Keras model (-c "
                                  "without --exported)")
        if run_config is not None:
            check_image_size([n * args.refine_grid for n in run_config.model.image_size],
                             dataset, grid=args.refine_grid)
        for subset in subsets:               # labels to score that no scan has
            dataset.validate(VALIDATION_SCHEME if subset is None else subset,
                             check_labels=True)
        prepare_base(args.out)
        if args.merge is not None:           # --merge alone: find each report's parts
            return _merge(args, {subset: [] for subset in subsets})
        return _evaluate(args, run_config, info, dataset, subsets, shard)
    except (runs.RunError, DataError, EvaluationError, ExportError, ShardError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        remove_if_new_and_empty(args.out, existed)


def _merge(args, parts_by_subset: dict) -> int:
    """Write the unsharded report of each set of parts (named, or found by report name)."""
    from aldk_tf.reports import merge_json_reports, summarise
    groups: dict[str, list[str]] = {}
    for subset, parts in parts_by_subset.items():
        if not parts:
            stem = report_stem(report_run(args), args.rep, subset, args.name,
                               args.refine, args.refine_grid)
            found = find_parts(args.out, stem, ".json")
            if not found:
                raise EvaluationError(f"{args.out}: no parts {stem}.shard-*-of-*.json "
                                      "to merge")
            groups[stem] = found
        for path in parts:
            named = split_name(path, ".json")
            if named is None or not path.endswith(".json"):
                raise EvaluationError(f"{path}: not a shard part "
                                      "(<report>.shard-<i>-of-<n>.json)")
            groups.setdefault(named[0], []).append(path)
    for stem, parts in groups.items():
        _check_same_weights(parts)
        metadata, records = merge_json_reports(parts)
        summary = summarise(records)
        text_path, json_path = _report_paths(args.out, stem)
        write_json_report(json_path, records, summary, **metadata)
        write_rcn_report(text_path, records)
        write_label_csv(_csv_path(text_path), records)
        print(f"merged {len(parts)} parts: {_summary_line(summary)} -> {text_path}")
    return 0


def _check_same_weights(parts: list[str]) -> None:
    """EvaluationError unless every part was evaluated with the same weights."""
    from aldk_tf.reports import read_json_report
    first = read_json_report(parts[0]).get("weights_sha256")
    for path in parts[1:]:
        other = read_json_report(path).get("weights_sha256")
        if other != first:
            raise EvaluationError(f"{path}: evaluated with other weights than "
                                  f"{parts[0]} (weights_sha256 {str(other)[:12]} vs "
                                  f"{str(first)[:12]}); evaluate every shard with the "
                                  "same model")


def _report_paths(out_dir: str, stem: str) -> tuple[str, str]:
    return os.path.join(out_dir, f"{stem}.txt"), os.path.join(out_dir, f"{stem}.json")


def _csv_path(text_path: str) -> str:
    return text_path[:-len(".txt")] + ".csv"


def _summary_line(summary: dict) -> str:
    line = f"Dice {summary['dice']['mean']:.4f} ({summary['dice']['std']:.4f})"
    if "before" in summary:
        line += f" (before registration {summary['before']['dice']['mean']:.4f})"
    if "hd95" in summary:
        line += f", HD95 {summary['hd95']['mean']:.2f}"
    tre = summary.get("landmark_distance_mm", {}).get("mean", float("nan"))
    if tre == tre:                                            # not NaN
        line += f", TRE {tre:.2f} mm"
    return (line + f", folding {summary['folding_percent']['mean']:.3f}%, "
            f"{summary['seconds']['mean']:.3f} s/pair")


def _evaluate(args, run_config, info, dataset, subsets, shard=None) -> int:
    from aldk_tf.data import list_pairs
    from aldk_tf.evaluation import evaluate_pairs
    from aldk_tf.reports import shard_metadata, summarise

    refined = ({"refine_steps": args.refine, "refine_learning_rate": args.refine_lr}
               if args.refine else {})
    if args.refine_grid > 1:
        refined["refine_grid"] = args.refine_grid
    name = args.name
    if args.exported:
        # The scores belong to the exported model: its identity, not the -c run's.
        model, default_name, identity = exported_model(args.exported, dataset)
        name = name or default_name
        info = identity["export_info"]
        rep, parameters = info.get("rep"), info.get("parameters")
        identity.update(run=info.get("run"), model=info.get("model"))
    else:
        _, model = runs.load_model(args.checkpoint, rep=args.rep)
        rep, parameters = model.rep, int(model.count_params())
        if args.refine_grid > 1:
            from aldk_tf.evaluation import finer_grid_model
            model = finer_grid_model(model, args.refine_grid, args.refine,
                                     args.refine_lr * args.refine_grid)
        identity = {"run": args.checkpoint, "exported": None,
                    "weights_sha256": fingerprint(runs.weights_path(args.checkpoint)),
                    "model": run_config.to_dict()["model"]}
    for subset in subsets:
        scheme = VALIDATION_SCHEME if subset is None else subset
        pairs = list_pairs(dataset, scheme, paired=True if args.paired else None)
        stem = report_stem(report_run(args), args.rep, subset, name, args.refine,
                           args.refine_grid)
        part = {}
        if shard is not None:
            part = {"shard": shard_metadata(shard, len(pairs))}
            pairs, stem = shard.select(pairs), shard.name(stem)
        print(f"Evaluating {len(pairs)} pairs of '{scheme}' "
              f"{f'(shard {shard}) ' if shard else ''}({dataset.where}, rep {rep}"
              f"{f', refined by {args.refine} steps' if args.refine else ''})", flush=True)
        if pairs:
            records, summary = evaluate_pairs(model, dataset, pairs, batch=args.batch,
                                              label_values=dataset.label_values,
                                              progress=not args.no_progress,
                                              # (on a finer grid: inside the model)
                                              refine=0 if args.refine_grid > 1
                                              else args.refine,
                                              refine_learning_rate=args.refine_lr,
                                              surface=not args.no_surface, before=True)
        else:                                # a shard of fewer pairs than shards
            records, summary = [], summarise([])
        text_path, json_path = _report_paths(args.out, stem)
        write_json_report(json_path, records, summary, **identity,
                          dataset=str(dataset.where), scheme=scheme, rep=rep,
                          paired=bool(args.paired), batch=args.batch,
                          parameters=parameters, **refined, **part)
        write_rcn_report(text_path, records)
        write_label_csv(_csv_path(text_path), records)
        print(f"{_summary_line(summary)} -> {text_path}, {_csv_path(text_path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
