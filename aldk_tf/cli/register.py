"""``aldk-register``: register a pair of scans, or every pair of a CSV, with an exported model.

    aldk-register --model export/<name>[/<N>] --fixed F.nii.gz --moving M.nii.gz --out DIR
        [--moving-seg S.nii.gz] [--jacobian] [--preview] [--overwrite]
        [--fixed-mask FM.nii.gz --moving-mask MM.nii.gz] [--flow-space lps|ras]
        [--modality/--crop/--margin/--intensity/--window/--percentiles/...]
        [--refine N [--refine-lr VOXELS]] [--verbose]
    aldk-register --model ... --pairs pairs.csv --out DIR          # many pairs

What is written and how: :mod:`aldk_tf.deploy.register`; the preprocessing flags:
:mod:`aldk_tf.deploy.preparation`. Also ``python -m aldk_tf.cli.register``. Parsing the
flags imports no TensorFlow (``--help`` and a bad flag answer at once); TensorFlow's
start-up log lines are hidden unless ``--verbose``.
"""

from __future__ import annotations

import argparse
import os
import sys

from aldk_tf.data import DataError
from aldk_tf.deploy.preparation import (RegisterError, add_preprocessing_arguments,
                                        preprocessing_overrides)
from aldk_tf.deploy.warp import FLOW_SPACES, WarpError
from aldk_tf.refine_options import add_arguments as add_refine_arguments
from aldk_tf.refine_options import add_grid_argument


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Register a pair of scans (NIfTI files or DICOM series folders) with "
        "an exported model (export.py).",
        epilog="Writes warped.nii.gz, flow.nii.gz, [warped_seg.nii.gz], registration.json "
        "(and jacobian.nii.gz, preview.png on request) into --out; apply flow.nii.gz to "
        "other images with aldk-warp, or antsApplyTransforms -t flow.nii.gz (LPS).")
    parser.add_argument("--model", required=True, help="SavedModel version directory "
                        "export/<name>/<N> (or export/<name>: its latest version)")
    parser.add_argument("--fixed", help="fixed image (NIfTI file or DICOM series folder)")
    parser.add_argument("--moving", help="moving image (NIfTI file or DICOM series "
                        "folder)")
    parser.add_argument("--pairs", help="instead of --fixed/--moving: a CSV with columns "
                        "fixed, moving [, moving_seg, fixed_mask, moving_mask, name]; "
                        "one output folder per pair in --out, plus summary.csv")
    parser.add_argument("--out", "--out-dir", "--out_dir", dest="out_dir", required=True,
                        help="output folder (must not exist or be empty, or --overwrite); "
                        "with --pairs the folder of the pairs' folders")
    parser.add_argument("--no-progress", action="store_true", help="no progress output "
                        "(--pairs)")
    parser.add_argument("--moving-seg", "--moving_seg", dest="moving_seg",
                        help="moving segmentation (NIfTI labels, up to int32) to warp")
    parser.add_argument("--flow-space", "--flow_space", dest="flow_space",
                        choices=FLOW_SPACES, default="lps",
                        help="axes of flow.nii.gz's vectors: lps (ITK/ANTs, default) or "
                        "ras (nibabel)")
    parser.add_argument("--jacobian", action="store_true", help="also write "
                        "jacobian.nii.gz (det of the Jacobian on the fixed grid)")
    parser.add_argument("--preview", action="store_true", help="also write preview.png "
                        "(central slices on the fixed scan's grid)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing "
                        "output folder (no file of the previous result is kept)")
    parser.add_argument("--verbose", action="store_true", help="show TensorFlow's log "
                        "lines")
    add_preprocessing_arguments(parser)
    add_refine_arguments(parser, "refine the model's flow by")
    add_grid_argument(parser)
    args = parser.parse_args(argv)
    single = args.fixed is not None or args.moving is not None
    if args.pairs is not None and (single or args.moving_seg or args.fixed_mask
                                   or args.moving_mask):
        parser.error("--pairs replaces --fixed/--moving/--moving-seg and the masks (give "
                     "them as CSV columns)")
    if args.pairs is None and (args.fixed is None or args.moving is None):
        parser.error("--fixed and --moving are required (or --pairs CSV)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from aldk_tf.console import import_tensorflow
    tf = import_tensorflow(args.verbose)
    if not args.refine:
        # Without refinement a pair is one call of a small graph, for which Grappler's
        # rewrite costs more than it gains: first call 0.33 -> 0.24 s, later calls 42 vs
        # 43 ms (shipped student, quiet 2-core machine). Refinement keeps it.
        tf.config.optimizer.set_experimental_options({"disable_meta_optimizer": True})
    if args.pairs is not None:
        return _main_batch(args)
    from aldk_tf.data.preprocess import PreprocessSettings
    from aldk_tf.deploy.register import register_pair
    try:
        result = register_pair(args.model, args.fixed, args.moving, args.out_dir,
                               moving_seg=args.moving_seg, fixed_mask=args.fixed_mask,
                               moving_mask=args.moving_mask,
                               overrides=preprocessing_overrides(args),
                               refine=args.refine, refine_learning_rate=args.refine_lr,
                               flow_space=args.flow_space, overwrite=args.overwrite,
                               jacobian=args.jacobian, preview=args.preview,
                               refine_grid=args.refine_grid)
    except (RegisterError, DataError, WarpError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for note in result["notes"]:
        print(f"note: {note}")
    settings = PreprocessSettings.from_dict(result["preprocessing"])
    print(f"preprocessing: {settings.describe()}")
    for path in result["outputs"]:
        print(path)
    print(f"flow: {result['flow_space'].upper()} mm; network "
          f"{result['network_seconds']:.2f} s, pair {result['wall_seconds']:.2f} s "
          "(reading to written)")
    for grid, shape in (("model", result["image_size"]),
                        ("fixed", result["fixed_grid_shape"])):
        print(f"{grid} grid {'x'.join(map(str, shape))}: folding "
              f"{result[f'folding_percent_{grid}_grid']:.3f}%, std det(J) "
              f"{result[f'jacobian_det_std_{grid}_grid']:.3f}")
    if result["refine_steps"]:
        print(f"refined by {result['refine_steps']} steps on a "
              f"{'x'.join(map(str, result['refine_grid']))} grid in "
              f"{result['refine_seconds']:.2f} s")
    return 0


def _main_batch(args) -> int:
    from aldk_tf.deploy.register_batch import SUMMARY_NAME, PairsError, register_batch
    try:
        rows = register_batch(args.model, args.pairs, args.out_dir,
                              overrides=preprocessing_overrides(args), refine=args.refine,
                              refine_learning_rate=args.refine_lr,
                              flow_space=args.flow_space, overwrite=args.overwrite,
                              progress=not args.no_progress, jacobian=args.jacobian,
                              preview=args.preview, refine_grid=args.refine_grid)
    except (RegisterError, DataError, PairsError, WarpError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    failed = [row for row in rows if row["status"] != "ok"]
    for row in failed:
        print(f"{row['name']}: {row['status']}", file=sys.stderr)
    print(f"{len(rows) - len(failed)} of {len(rows)} pairs registered -> "
          f"{os.path.join(args.out_dir, SUMMARY_NAME)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
