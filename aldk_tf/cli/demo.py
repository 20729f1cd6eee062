"""``aldk-demo``: the whole pipeline, offline, on the embedded demo dataset.

    aldk-demo [--out demo_run] [--size 32] [--crd-control] [--no-export] ...

What it builds, trains, evaluates and exports: :mod:`aldk_tf.pipeline.demo`. Also
``python -m aldk_tf.cli.demo``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from aldk_tf.pipeline import demo  # noqa: E402
from aldk_tf.training import runs  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=demo.__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="demo_run", help="output folder (default demo_run)")
    parser.add_argument("--size", type=int, default=32, help="volume size (32, 64, 128)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--teacher-steps", type=int, default=720)
    parser.add_argument("--student-steps", type=int, default=360,
                        help="steps of every student row (the same generated batches)")
    parser.add_argument("--teacher-reps", type=int, default=3,
                        help="apply the teacher's cascade 1..N times on the validation "
                             "pairs and keep the best (default 3)")
    parser.add_argument("--refine-steps", type=int, default=20,
                        help="instance-optimisation steps refining the teacher's flow of "
                             "every batch before it is a distillation target (default 20; "
                             "0: the raw flow)")
    parser.add_argument("--warp-weight", type=float, default=1.0,
                        help="weight of the image-level distillation term (the student's "
                             "warped image against the moving image warped by the "
                             "teacher's refined flow; the similarity's weight is 1)")
    parser.add_argument("--distill-target", choices=("warped", "warped_gated"),
                        default="warped",
                        help="warped_gated: the image-level term only on pairs the "
                             "teacher aligns better than the student")
    parser.add_argument("--teacher-cascades", type=int, default=1)
    parser.add_argument("--validation", type=int, default=4, help="validation subjects")
    parser.add_argument("--test", type=int, default=4, help="test subjects")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3,
                        help="Adam learning rate of the first three of six epochs, then "
                             "halved every epoch")
    parser.add_argument("--precision", choices=("auto", "float32", "bfloat16"),
                        default="auto",
                        help="auto: bfloat16 where the CPU computes it natively")
    parser.add_argument("--no-crd", action="store_true",
                        help="skip the cross-resolution student")
    parser.add_argument("--crd-control", action="store_true",
                        help="also train the CRD terms at full resolution (the control "
                             "that isolates what the resolution costs)")
    parser.add_argument("--same-anatomy", action="store_true",
                        help="subjects are warps of the one template (no anatomy "
                             "variation)")
    parser.add_argument("--no-export", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from aldk_tf.data import DataError
    started = time.perf_counter()
    try:
        results, command = demo.run_demo(args)
    except (DataError, runs.RunError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(demo.format_table(results, args.size))
    if command is not None:
        print(command)
    print(f"total {time.perf_counter() - started:.0f} s; results in "
          f"{os.path.join(os.path.abspath(args.out), 'results.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
