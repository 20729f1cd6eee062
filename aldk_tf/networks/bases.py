"""The deformable base networks a cascade is built of: the one table that
:class:`~aldk_tf.networks.cascade.RecursiveCascade`, the run configuration and
``aldk-train -b`` read.

No TensorFlow is imported here (a network class is imported when it is built):
``aldk-train`` reads the table before it chooses its devices.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class BaseNetwork:
    """One base network and how a training run uses it."""
    network: str                  # "<module>.<class>" under aldk_tf.networks
    flag: str                     # its name for aldk-train -b
    role: str                     # "teacher" or "student": the run that trains it
    affine: str                   # the affine stem before its cascades in such a run
    settings: tuple[str, ...] = ()    # cascade settings it takes besides size and name

    def network_class(self):
        """The Keras model class (importing it imports TensorFlow)."""
        module, name = self.network.rsplit(".", 1)
        return getattr(importlib.import_module(f"aldk_tf.networks.{module}"), name)


#: The student's decoders: the ALDK paper's (transposed convolutions) and the released
#: code's (upsampling + convolutions); see :class:`~aldk_tf.networks.student.StudentNet`.
STUDENT_VARIANTS = ("paper", "release")
#: Earlier names of the variants, still in saved configs: "seed" was the seed paper's.
OLD_STUDENT_VARIANTS = {"seed": "paper"}


def student_variant_name(name: str) -> str:
    """Today's name of a student variant (an earlier one mapped; others pass unchanged,
    for the caller to check)."""
    return OLD_STUDENT_VARIANTS.get(name, name)


#: ``model.base`` -> the network. A cascade's ``channels`` reach VTN only: the student
#: keeps its paper's widths and VoxelMorph its fixed ones.
BASES = {
    "vtn": BaseNetwork("vtn.VTNNet", "VTN", "teacher", "vtn", ("channels",)),
    "voxelmorph": BaseNetwork("voxelmorph.VoxelMorphNet", "VoxelMorph", "teacher", "vtn"),
    "student": BaseNetwork("student.StudentNet", "LDR", "student", "student", ("variant",)),
}
