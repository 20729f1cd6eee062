"""Evaluate a trained run: ``python evaluate.py`` in a checkout, ``aldk-evaluate`` installed.

A thin front end: the flags and the reports are in :mod:`aldk_tf.cli.evaluate`
(``python evaluate.py --help``).
"""

import sys

from aldk_tf.cli.evaluate import main, parse_args, report_stem

__all__ = ["main", "parse_args", "report_stem"]

if __name__ == "__main__":
    sys.exit(main())
