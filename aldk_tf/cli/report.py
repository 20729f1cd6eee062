"""``aldk-report``: parameters per stage of the teacher and student models.

    aldk-report [--size 128]

The models and the counts: :func:`aldk_tf.networks.parameters.parameter_reports`. Also
``python -m aldk_tf.cli.report``.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from aldk_tf.networks import parameters  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Parameter counts per stage (affine, cascades, heads) of the teacher "
        "and student models.")
    parser.add_argument("--size", type=int, default=128, help="cubic input size, a "
                        "multiple of 16 (default 128)")
    args = parser.parse_args(argv)
    try:
        if args.size < 16 or args.size % 16:
            raise ValueError(f"expected a cubic size that is a positive multiple of 16 "
                             f"(the network's total stride), got {args.size}")
        reports = parameters.parameter_reports(args.size)
    except ValueError as error:           # also a size the half-resolution student lacks
        print(f"error: --size: {error}", file=sys.stderr)
        return 2
    for name, counts in reports.items():
        stages = ", ".join(f"{stage} {count:,}" for stage, count in counts.items()
                           if stage != "total")
        print(f"{name}: {counts['total']:,} ({stages})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
