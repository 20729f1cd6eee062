"""Parameters per stage of the teacher and student models (``aldk-report``,
:mod:`aldk_tf.cli.report`).

Parameters per stage (affine stage, each cascade) of the teacher and student models,
from :meth:`RecursiveCascade.parameter_report`; evaluation and the benchmark use the same
function.
"""

from __future__ import annotations

# The package, not its builders: TensorFlow is imported when a model is built.
from aldk_tf import networks

MODELS = {
    "teacher: VTN affine + 1 VTN cascade": lambda s: networks.build_teacher(s, 1),
    "teacher: VTN affine + 3 VTN cascades": lambda s: networks.build_teacher(s, 3),
    "student: affine + 1 cascade (paper)": lambda s: networks.build_student(s, 1),
    "student: affine + 3 cascades (paper)": lambda s: networks.build_student(s, 3),
    "student: affine + 1 cascade (release variant)": lambda s: networks.build_student(
        s, 1, variant="release"),
    "student: cross-resolution 1/2, affine + 1 cascade": lambda s: networks.build_student(
        s, 1, resolution_factor=2),
}


def parameter_reports(size: int = 128) -> dict[str, dict[str, int]]:
    shape = (size,) * 3
    return {name: build(shape).parameter_report() for name, build in MODELS.items()}

