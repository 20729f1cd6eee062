"""Convert NIfTI scans into an RCN-layout dataset: ``aldk-prep`` installed.

A thin front end: the flags and the layout are in :mod:`aldk_tf.cli.nifti_to_h5`
(``python data_prep/nifti_to_h5.py --help``).
"""

import sys

from aldk_tf.cli.nifti_to_h5 import convert, main, parse_args

__all__ = ["convert", "main", "parse_args"]

if __name__ == "__main__":
    sys.exit(main())
