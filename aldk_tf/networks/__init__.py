"""Registration networks: affine stems, deformable base networks and cascades.

The names below are imported from their modules on first use, so that importing
:mod:`aldk_tf.networks.bases` (which ``aldk-train`` reads before it chooses its devices)
imports no TensorFlow.
"""

import importlib

_HOMES = {"AffineStem": "affine", "RecursiveCascade": "cascade", "build_student": "cascade",
          "build_teacher": "cascade", "StudentNet": "student", "VTNNet": "vtn",
          "VoxelMorphNet": "voxelmorph"}

__all__ = [*_HOMES, "BASE_NETWORKS"]


def __getattr__(name):
    if name == "BASE_NETWORKS":             # model.base -> its Keras model class
        from aldk_tf.networks.bases import BASES
        return {base: spec.network_class() for base, spec in BASES.items()}
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
