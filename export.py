"""Export a trained run: ``python export.py`` in a checkout, ``aldk-export`` installed.

A thin front end: the flags and the exported forms are in :mod:`aldk_tf.cli.export`
(``python export.py --help``).
"""

import sys

from aldk_tf.cli.export import main, parse_args, tflite_variants

__all__ = ["main", "parse_args", "tflite_variants"]

if __name__ == "__main__":
    sys.exit(main())
