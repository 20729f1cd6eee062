#!/usr/bin/env python
"""Train a teacher or a student: ``python train.py`` in a checkout, ``aldk-train`` installed.

A thin front end: the flags, the run directory and everything else are in
:mod:`aldk_tf.cli.train` (``python train.py --help``).
"""

import sys

from aldk_tf.cli.train import BASES, build_config, main, parse_args

__all__ = ["BASES", "build_config", "main", "parse_args"]

if __name__ == "__main__":
    sys.exit(main())
