"""Instance optimisation (:func:`aldk_tf.training.refine.refine_flow`): time per pair, and Dice
before/after refining from a zero flow on a dataset's pairs.

    python bench/refine.py [--sizes 64 128] [--steps 0 25 50 100] [--lr 0.25]
                           [--repeats 2] [-d demo.json [-v test]]

Timing: one pair (batch 1) of smooth random volumes per size, median wall time and
process CPU time (all threads) of ``--repeats`` calls after one warm-up call (tracing);
0 steps is the cost of the validation and the two objective evaluations alone.
With ``-d``: every pair of ``-v/--val-subset``, refined from a zero flow in one batch; mean Dice
over labels, % voxels with det(J) <= 0 and the objective before/after, per step count.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import scipy.ndimage as ndimage  # noqa: E402

from aldk_tf import metrics  # noqa: E402
from aldk_tf.training.refine import DEFAULT_LEARNING_RATE, refine_flow  # noqa: E402

try:                                 # python -m bench.<script>; imported from the root (tests)
    from bench.timing import repeat_timed
except ModuleNotFoundError:          # python bench/<script>.py: sys.path[0] is bench/
    from timing import repeat_timed


def smooth_volume(rng, size: int, sigma: float) -> np.ndarray:
    volume = ndimage.gaussian_filter(rng.normal(size=(size,) * 3), sigma)
    volume = (volume - volume.min()) / (volume.max() - volume.min())
    return volume[None, ..., None].astype(np.float32)


def time_sizes(sizes, steps_list, learning_rate, repeats) -> None:
    print("size  steps  wall s/pair  cpu s/pair")
    for size in sizes:
        rng = np.random.default_rng(size)
        fixed, moving = (smooth_volume(rng, size, size / 32) for _ in range(2))
        zero = np.zeros((1, size, size, size, 3), np.float32)
        for steps in steps_list:
            def call():
                refine_flow(fixed, moving, zero, steps,
                            learning_rate=learning_rate)[0].numpy()
            call()                                             # tracing
            wall, cpu = repeat_timed(call, repeats)
            print(f"{size:4d}  {steps:5d}  {np.median(wall):11.2f}  {np.median(cpu):10.2f}",
                  flush=True)


def dice_from_zero(dataset_path, scheme, steps_list, learning_rate) -> None:
    from aldk_tf.data import list_pairs, load_dataset_config, load_pair
    dataset = load_dataset_config(dataset_path)
    pairs = list_pairs(dataset, scheme)
    loaded = [load_pair(dataset, *pair) for pair in pairs]
    stacked = {key: np.stack([pair[key] for pair in loaded])
               for key in ("fixed", "moving", "fixed_seg", "moving_seg")}
    zero = np.zeros(stacked["fixed"].shape[:4] + (3,), np.float32)
    print(f"{len(pairs)} pairs of '{scheme}' ({dataset.where}), from a zero flow, "
          f"lr {learning_rate}")
    print("steps  dice    folding %  objective before -> after")
    for steps in steps_list:
        flow, info = refine_flow(stacked["fixed"], stacked["moving"], zero, steps,
                                 learning_rate=learning_rate)
        result = metrics.pair_metrics(stacked["fixed_seg"], stacked["moving_seg"],
                                      flow.numpy(), dataset.label_values)
        print(f"{steps:5d}  {np.nanmean(result['dice']):.4f}  "
              f"{result['folding_percent'].mean():9.3f}  "
              f"{info['initial_loss'].numpy().mean():.4f} -> "
              f"{info['final_loss'].numpy().mean():.4f}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[64, 128])
    parser.add_argument("--steps", type=int, nargs="+", default=[0, 25, 50, 100])
    parser.add_argument("--lr", type=float, default=DEFAULT_LEARNING_RATE)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("-d", "--dataset", help="dataset JSON for the Dice measurement")
    parser.add_argument("-v", "--val-subset", "--scheme", dest="scheme", default="test",
                        help="scheme or subset (default test)")
    args = parser.parse_args(argv)
    if args.dataset:
        dice_from_zero(args.dataset, args.scheme, args.steps, args.lr)
    if args.sizes:
        time_sizes(args.sizes, args.steps, args.lr, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
