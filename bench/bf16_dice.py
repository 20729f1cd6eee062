"""Dice of a trained run with the fast inference paths: Keras vs float32 vs bfloat16.

    python bench/bf16_dice.py -c weights/<run> [-d dataset.json] [-v test] [--json PATH]

Evaluates the run's registration model on the pairs of a scheme or subset (default
``test``) three ways, with :func:`aldk_tf.evaluation.evaluate_pairs` (the evaluation's
own warping and metrics):

- ``keras``: the Keras graph unchanged (``subpixel=False``, float32), as ``evaluate.py``
  runs it;
- ``float32``: :func:`aldk_tf.deploy.inference.registration_function` (fixed signature,
  sub-pixel flow heads) -- should give the same Dice;
- ``bfloat16``: the same with the convolutions in bfloat16.

Prints mean Dice (std), its change against ``keras``, the largest flow difference from
``keras`` over all pairs, and milliseconds per pair (this machine, batch 1).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

from aldk_tf.training import runs  # noqa: E402
from aldk_tf.config import atomic_write_text  # noqa: E402
from aldk_tf.data import DataError, list_pairs, load_dataset_config  # noqa: E402
from aldk_tf.evaluation import EvaluationError, evaluate_pairs  # noqa: E402
from aldk_tf.deploy.inference import registration_function  # noqa: E402


class Recorder:
    """``(fixed, moving) -> {"flow"}`` through ``register``, keeping every flow."""

    def __init__(self, register):
        self.register, self.flows = register, []

    def __call__(self, fixed, moving):
        outputs = self.register(np.asarray(fixed, np.float32),
                                np.asarray(moving, np.float32))
        flow = outputs["flow"].numpy()
        self.flows.append(flow)
        return {"flow": flow}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--checkpoint", required=True, help="run directory")
    parser.add_argument("-d", "--dataset", help="dataset JSON (default: the run's)")
    parser.add_argument("-v", "--val-subset", "--subset", dest="subset", default="test",
                        help="scheme or subset "
                        "(default test)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    try:
        config, model = runs.load_model(args.checkpoint)
        dataset = load_dataset_config(args.dataset or config.dataset)
        pairs = list_pairs(dataset, args.subset)
        ways = {"keras": Recorder(registration_function(model, subpixel=False)),
                "float32": Recorder(registration_function(model)),
                "bfloat16": Recorder(registration_function(model, dtype="bfloat16"))}
        results = {}
        for name, recorder in ways.items():
            # The warm-up call of evaluate_pairs is recorded too: drop it afterwards.
            _, summary = evaluate_pairs(recorder, dataset, pairs,
                                        label_values=dataset.label_values, progress=False)
            recorder.flows = recorder.flows[1:]
            results[name] = {"dice": summary["dice"]["mean"],
                             "dice_std": summary["dice"]["std"],
                             "ms_per_pair": 1e3 * summary["seconds"]["mean"]}
    except (DataError, runs.RunError, EvaluationError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    reference = ways["keras"].flows
    print(f"{args.checkpoint}: {len(pairs)} {args.subset} pairs at "
          f"{tuple(dataset.image_size)}, batch 1, load average {os.getloadavg()[0]:.1f}")
    print(f"{'':10s}{'Dice (std)':>18s}{'change':>10s}{'max |dflow|':>13s}{'ms/pair':>9s}")
    for name, result in results.items():
        difference = max(float(np.abs(a - b).max())
                         for a, b in zip(ways[name].flows, reference))
        result.update(dice_change=result["dice"] - results["keras"]["dice"],
                      max_abs_flow_diff=difference)
        print(f"{name:10s}{result['dice']:10.4f} ({result['dice_std']:.4f})"
              f"{result['dice_change']:+10.4f}{difference:13.3g}"
              f"{result['ms_per_pair']:9.1f}")
    if args.json:
        atomic_write_text(args.json, json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
