"""The ``--refine N`` / ``--refine-lr`` flags of the command lines, without TensorFlow.

:mod:`aldk_tf.training.refine` does the refinement and imports TensorFlow; the flags,
their check and the default step size are defined here, once (that module re-exports
them), so that ``--help`` and a bad flag answer without loading TensorFlow.
"""

from __future__ import annotations

import math

#: Default Adam learning rate of the refinement, in voxels.
DEFAULT_LEARNING_RATE = 0.25


def add_arguments(parser, what: str = "refine each flow") -> None:
    """``--refine N`` and ``--refine-lr`` for a command line (``what``: the help's verb
    phrase, e.g. "store each flow after")."""
    parser.add_argument("--refine", type=int, default=0, metavar="N",
                        help=f"{what} N instance-optimisation steps (default 0: none)")
    parser.add_argument("--refine-lr", "--refine_lr", type=float,
                        default=DEFAULT_LEARNING_RATE, metavar="VOXELS",
                        help="Adam step size of the refinement, in voxels "
                        f"(default {DEFAULT_LEARNING_RATE})")


def check_arguments(steps: int, learning_rate: float) -> None:
    """ValueError naming the flag unless ``--refine`` and ``--refine-lr`` are in range."""
    if steps < 0:
        raise ValueError(f"--refine: expected an integer >= 0, got {steps}")
    if not 0 < learning_rate < math.inf:
        raise ValueError(f"--refine-lr: expected a finite step size > 0 (voxels), got "
                         f"{learning_rate}")


#: ``aldk-register --refine-grid``: refinement on a grid this many times finer than the
#: model's (capped so that its voxels are not finer than the fixed scan's).
DEFAULT_REFINE_GRID = 2
MAX_REFINE_GRID = 4


def add_grid_argument(parser) -> None:
    """``--refine-grid F`` of aldk-register."""
    parser.add_argument("--refine-grid", "--refine_grid", type=int,
                        default=DEFAULT_REFINE_GRID, metavar="F",
                        help="refine on a grid F times finer than the model's (the same "
                             "crop boxes; the network's flow upsampled as the start), "
                             "lowered so that its voxels are not finer than the fixed "
                             f"scan's; 1: the model's grid (default {DEFAULT_REFINE_GRID})")

