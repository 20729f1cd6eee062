"""Build the embedded demo dataset offline: ``aldk-build-demo`` installed.

A thin front end: the flags and the dataset are in :mod:`aldk_tf.cli.build_demo`
(``python data_prep/build_demo.py --help``).
"""

import sys

from aldk_tf.cli.build_demo import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
