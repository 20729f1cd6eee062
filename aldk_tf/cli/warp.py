"""``aldk-warp``: apply a flow saved by ``aldk-register`` to any NIfTI image or label map.

    aldk-warp --flow DIR/flow.nii.gz --image M.nii.gz --out W.nii.gz
        [--interpolation linear|nearest|labels] [--flow-space auto|ras|lps] [--overwrite]

Flow spaces and interpolations: :mod:`aldk_tf.deploy.warp`. Also
``python -m aldk_tf.cli.warp``.
"""

from __future__ import annotations

import argparse
import sys

from aldk_tf.data import DataError
from aldk_tf.deploy.warp import FLOW_SPACES, INTERPOLATIONS, WarpError, warp_file


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Apply a flow saved by aldk-register to a NIfTI image or label map "
        "(result on the fixed grid).",
        epilog="Flow spaces: ras = world RAS mm (nibabel, register's default); lps = "
        "ITK/ANTs physical space (x and y negated; register's default); auto = as the "
        "file's intent name says.")
    parser.add_argument("--flow", required=True, help="flow.nii.gz written by register")
    parser.add_argument("--image", required=True, help="NIfTI image or label map to warp")
    parser.add_argument("--out", required=True, help="output .nii or .nii.gz")
    parser.add_argument("--interpolation", choices=INTERPOLATIONS, default="linear",
                        help="linear (images, default; float32), nearest (label maps: "
                        "values and dtype kept) or labels (label maps: the evaluation's "
                        "per-label rule)")
    parser.add_argument("--flow-space", "--flow_space", dest="flow_space",
                        choices=("auto", *FLOW_SPACES), default="auto",
                        help="axes of the flow's vectors (default auto: from the file)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out")
    parser.add_argument("--verbose", action="store_true", help="show TensorFlow's log "
                        "lines")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from aldk_tf.console import import_tensorflow
    import_tensorflow(args.verbose)
    try:
        result = warp_file(args.flow, args.image, args.out, args.interpolation,
                           args.flow_space, args.overwrite)
    except (WarpError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for warning in result["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{result['out']}  ({'x'.join(map(str, result['shape']))} {result['dtype']}, "
          f"flow read as {result['flow_space'].upper()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
