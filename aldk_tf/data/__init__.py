"""Datasets in the RCN release layout: HDF5 scans + JSON config, pairs, augmentation.

- :mod:`.hdf5`       read/write the HDF5 files
- :mod:`.dataset_config` the JSON configuration (files, subsets, schemes)
- :mod:`.pairs`      ``tf.data`` pipeline of (fixed, moving) pairs
- :mod:`.augment`    random free-form deformation of the moving side
- :mod:`.preprocess` NIfTI → cropped, resampled uint8 volumes (shared by data_prep and
  registration of new scans)
- :mod:`.demo_set`   the embedded demo dataset built from nilearn's MNI152 template

The TensorFlow-dependent names (``pair_dataset``, ``augment_pair`` ...) are imported on
first use, so the HDF5 and preprocessing tools start without loading TensorFlow.
"""

import importlib

from .errors import DataError
from .dataset_config import (TRAINING_SCHEME, VALIDATION_SCHEME, DatasetConfig,
                             load_dataset_config, write_dataset_config)
from .hdf5 import DatasetWriter, ScanStore, list_scans, read_dataset, write_dataset

_LAZY = {
    "pair_dataset": "pairs", "list_pairs": "pairs", "load_pair": "pairs",
    "free_form_flow": "augment", "augment_pair": "augment",
    "transform_points": "augment",
}

__all__ = ["DataError", "DatasetConfig", "DatasetWriter", "ScanStore", "TRAINING_SCHEME",
           "VALIDATION_SCHEME", "list_scans", "load_dataset_config", "read_dataset",
           "write_dataset", "write_dataset_config", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
