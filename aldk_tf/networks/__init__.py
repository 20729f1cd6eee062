"""Registration networks: affine stems, deformable base networks and cascades."""

from aldk_tf.networks.affine import AffineStem
from aldk_tf.networks.cascade import RecursiveCascade, build_student, build_teacher
from aldk_tf.networks.student import StudentNet
from aldk_tf.networks.voxelmorph import VoxelMorphNet
from aldk_tf.networks.vtn import VTNNet

BASE_NETWORKS = {
    "vtn": VTNNet,
    "voxelmorph": VoxelMorphNet,
    "student": StudentNet,
}

__all__ = ["AffineStem", "RecursiveCascade", "StudentNet", "VTNNet", "VoxelMorphNet",
           "BASE_NETWORKS", "build_student", "build_teacher"]
