"""Training curves side by side: mean loss terms per window of steps, from TensorBoard logs.

    python bench/curves.py study_64/weights/teacher study_64/weights/student --every 200

Runs log ``loss/<term>``: the mean over the steps since the previous point, at the
global step (:mod:`aldk_tf.training.monitor`); the mean over the window ``(a, b]`` is
the step-weighted mean of its points. Runs of earlier versions logged Keras'
``batch_<term>`` every 50 steps as the running mean since the start of the ``fit`` call
(one call per epoch); the mean over the window is then ``(b * M_b - a * M_a) / (b - a)``.
Either is exact when ``--every`` is a multiple of the logging interval. Prints a
Markdown table per term (rows: end step of each window; columns: runs).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

TERMS = ("loss", "similarity", "smoothness")


def running_means(run_dir: str, term: str) -> list[tuple[int, dict[int, float]]]:
    """Per ``fit`` call (epoch): ``(first global step, {local step: running mean})`` of
    ``batch_<term>``."""
    import tensorflow as tf
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from aldk_tf.training import runs
    steps_per_epoch = runs.load_run_config(run_dir).train.round
    files = sorted(glob.glob(os.path.join(run_dir, runs.LOG_DIR, "train", "events.*")),
                   key=os.path.getmtime)
    epochs = []
    for epoch, path in enumerate(files):
        events = EventAccumulator(path, size_guidance={"tensors": 0})
        events.Reload()
        if f"batch_{term}" in events.Tags()["tensors"]:
            epochs.append((epoch * steps_per_epoch,
                           {event.step: float(tf.make_ndarray(event.tensor_proto))
                            for event in events.Tensors(f"batch_{term}")}))
    return epochs


def step_means(run_dir: str, term: str) -> list[tuple[int, float]]:
    """``[(global step, mean since the previous point)]`` of ``loss/<term>`` (runs that
    log on the global step), sorted; empty for runs of earlier versions."""
    import tensorflow as tf
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from aldk_tf.training import monitor, runs
    points = {}
    for path in glob.glob(os.path.join(run_dir, runs.LOG_DIR, monitor.TRAIN_LOG,
                                       "events.*")):
        events = EventAccumulator(path, size_guidance={"tensors": 0})
        events.Reload()
        if f"loss/{term}" in events.Tags()["tensors"]:
            points.update({event.step: float(tf.make_ndarray(event.tensor_proto))
                           for event in events.Tensors(f"loss/{term}")})
    return sorted(points.items())


def windows_of_points(points, every: int) -> dict[int, float]:
    """``{end step: step-weighted mean of the points in the window}`` (full windows)."""
    sums: dict[int, list[float]] = {}
    previous = 0
    for step, mean in points:
        end = -(-step // every) * every
        entry = sums.setdefault(end, [0.0, 0.0])
        entry[0] += mean * (step - previous)
        entry[1] += step - previous
        previous = step
    return {end: total / steps for end, (total, steps) in sums.items() if steps == every}


def window_means(epochs, every: int) -> dict[int, float]:
    """``{global end step: mean of the term over the preceding `every` steps}``."""
    result = {}
    for first, means in epochs:
        previous_step, previous_mean = 0, 0.0
        for step in sorted(means):
            if step % every:
                continue
            result[first + step] = ((step * means[step] - previous_step * previous_mean)
                                    / (step - previous_step))
            previous_step, previous_mean = step, means[step]
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories")
    parser.add_argument("--every", type=int, default=100, help="window (multiple of 50)")
    parser.add_argument("--terms", default=",".join(TERMS))
    args = parser.parse_args(argv)
    if args.every <= 0:
        print(f"error: --every: expected a positive number of steps, got {args.every}",
              file=sys.stderr)
        return 2
    for term in args.terms.split(","):
        columns = {}
        for run in args.runs:
            points = step_means(run, term)
            if not points and args.every % 50:
                print(f"error: {run}: a run of an earlier version (Keras' batch logs "
                      "every 50 steps); --every must be a multiple of 50", file=sys.stderr)
                return 2
            columns[os.path.basename(os.path.normpath(run))] = (
                windows_of_points(points, args.every) if points
                else window_means(running_means(run, term), args.every))
        steps = sorted({step for column in columns.values() for step in column})
        print(f"\nmean training {term} per {args.every} steps\n")
        print("| steps | " + " | ".join(columns) + " |")
        print("|---" * (len(columns) + 1) + "|")
        for step in steps:
            cells = [f"{columns[name][step]:.4f}" if step in columns[name] else ""
                     for name in columns]
            print(f"| {step - args.every}–{step} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
