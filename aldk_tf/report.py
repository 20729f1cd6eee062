"""Parameter report: ``python -m aldk_tf.report [--size 128]``.

Parameters per stage (affine stage, each cascade) of the teacher and student models,
from :meth:`RecursiveCascade.parameter_report`; evaluation and the benchmark use the same
function.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from aldk_tf.networks import build_student, build_teacher  # noqa: E402

MODELS = {
    "teacher: VTN affine + 1 VTN cascade": lambda s: build_teacher(s, 1),
    "teacher: VTN affine + 3 VTN cascades": lambda s: build_teacher(s, 3),
    "student: affine + 1 cascade (paper)": lambda s: build_student(s, 1),
    "student: affine + 3 cascades (paper)": lambda s: build_student(s, 3),
    "student: affine + 1 cascade (release variant)": lambda s: build_student(
        s, 1, variant="release"),
    "student: cross-resolution 1/2, affine + 1 cascade": lambda s: build_student(
        s, 1, resolution_factor=2),
}


def parameter_reports(size: int = 128) -> dict[str, dict[str, int]]:
    shape = (size,) * 3
    return {name: build(shape).parameter_report() for name, build in MODELS.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args(argv)
    try:
        if args.size < 16 or args.size % 16:
            raise ValueError(f"expected a cubic size that is a positive multiple of 16 "
                             f"(the network's total stride), got {args.size}")
        reports = parameter_reports(args.size)
    except ValueError as error:
        print(f"error: --size: {error}", file=sys.stderr)
        return 2
    for name, report in reports.items():
        stages = ", ".join(f"{stage} {count:,}" for stage, count in report.items()
                           if stage != "total")
        print(f"{name}: {report['total']:,} ({stages})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
