"""Test-time refinement at a finer grid than the network's: ``python bench/refine_resolution.py``.

The held-out test subjects of a long run (:mod:`bench.long_train`) are built again at
``--factor`` times the size (same seeds: the same brains and deformations, finer voxels),
and every row is scored there, on the fine labels:

- ``before``;
- ``net``: the network on the pair downsampled to its grid, its flow upsampled;
- ``net+refine<N>@model``: refined on the network's grid, then upsampled;
- ``net+refine<N>@fine``: upsampled, then refined on the fine grid (warm start), with the
  step size in fine voxels as given, and ``...-lr<F>x`` with it times the factor (the same
  step in mm: what ``register --refine-grid`` does);
- ``syn``: ANTs SyN on the fine pair (``--ants-python``; ``--syn-pairs`` of them).

Seconds per pair are wall time on this machine (network, refinement and resampling; for
``syn`` the registration's own). Writes ``--json`` / ``--markdown``; finished rows are read
back from ``<out>/evaluate-<size>``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [p for p in (HERE, os.path.dirname(HERE)) if p not in sys.path]

from aldk_tf.config import atomic_write_text  # noqa: E402
from heldout_eval import AntsSyN, Identity  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="long_64", help="the long run's work folder")
    parser.add_argument("--run", required=True, help="run name under <out>/weights")
    parser.add_argument("--heldout-t1", required=True, help="as given to long_train.py")
    parser.add_argument("--factor", type=int, default=2)
    parser.add_argument("--refine", type=int, default=50)
    parser.add_argument("--refine-lr", type=float, default=None,
                        help="Adam step size in fine voxels (default: the library's)")
    parser.add_argument("--ants-python", help="python with antspyx (default: no syn row)")
    parser.add_argument("--syn-pairs", type=int, default=6)
    parser.add_argument("--json", default=os.path.join(HERE, "results",
                                                       "refine-resolution.json"))
    parser.add_argument("--markdown", default=os.path.join(HERE, "results",
                                                           "refine-resolution.md"))
    return parser.parse_args(argv)


def fine_dataset(args, settings: dict) -> str:
    """The long run's held-out subjects at ``factor`` x its size (built once)."""
    from aldk_tf.data.demo_set import build_demo
    size = settings["model"]["image_size"][0] * args.factor
    folder = os.path.join(os.path.abspath(args.out), f"data{size}")
    path = os.path.join(folder, "demo.json")
    coarse = json.load(open(os.path.join(args.out, "data", "demo.json")))
    subsets = coarse["subsets"]
    validation, test = len(subsets["demo-val"]), len(subsets["demo-test"])
    subjects = sum(len(v) for v in subsets.values())
    if not os.path.exists(path):
        print(f"[refine-resolution] building {subjects} subjects at {size}^3 in {folder}",
              file=sys.stderr)
        build_demo(folder, size=size, seed=settings["train"]["seed"], subjects=subjects,
                   validation=validation, test=test, log=None, vary=True,
                   test_template=args.heldout_t1, heldout_validation=True)
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    from aldk_tf import spatial
    from aldk_tf.data import list_pairs, load_dataset_config
    from aldk_tf.evaluation import _flow_function, evaluate_pairs, finer_grid_model
    from aldk_tf.training import runs
    from aldk_tf.training.refine import DEFAULT_LEARNING_RATE
    run_dir = os.path.join(args.out, "weights", args.run)
    config, model = runs.load_model(run_dir, best=True)
    dataset = load_dataset_config(fine_dataset(args, config.to_dict()))
    size = dataset.image_size[0]
    lr = args.refine_lr or DEFAULT_LEARNING_RATE
    command = "python bench/refine_resolution.py " + shlex.join(
        sys.argv[1:] if argv is None else argv)
    pairs = list_pairs(dataset, "test")

    model_grid_flow = _flow_function(model, args.refine, lr)

    def refined_at_model_grid(fixed, moving):
        low = [spatial.downsample(v, args.factor).numpy() for v in (fixed, moving)]
        flow = model_grid_flow(*low)
        return {"flow": spatial.upsample_flow(flow, args.factor).numpy()}

    rows_to_run = {
        "before": (Identity(), pairs),
        "net": (finer_grid_model(model, args.factor), pairs),
        f"net+refine{args.refine}@model": (refined_at_model_grid, pairs),
        f"net+refine{args.refine}@fine": (finer_grid_model(model, args.factor, args.refine,
                                                           lr), pairs),
        # the step size scaled with the grid (the same step in mm): what register does
        f"net+refine{args.refine}@fine-lr{args.factor}x": (
            finer_grid_model(model, args.factor, args.refine, lr * args.factor), pairs)}
    if args.ants_python:
        rows_to_run["syn"] = (AntsSyN(args.ants_python), pairs[:args.syn_pairs])
    rows: dict[str, dict] = {}
    folder = os.path.join(os.path.abspath(args.out), f"evaluate-{size}")
    os.makedirs(folder, exist_ok=True)
    for name, (flow_model, row_pairs) in rows_to_run.items():
        path = os.path.join(folder, f"{args.run}-{name}.json" if name.startswith("net")
                            else f"{name}.json")
        if os.path.exists(path):
            rows[name] = json.load(open(path))
            continue
        print(f"[refine-resolution] {name} on {len(row_pairs)} pairs at {size}^3",
              file=sys.stderr)
        _, summary = evaluate_pairs(flow_model, dataset, row_pairs, batch=1,
                                    label_values=dataset.label_values, progress=False)
        row = {"dice": summary["dice"]["mean"], "jacc": summary["jacc"]["mean"],
               "fold": summary["folding_percent"]["mean"],
               "seconds_per_pair": summary["seconds"]["mean"], "pairs": len(row_pairs)}
        if isinstance(flow_model, AntsSyN):
            row["seconds_per_pair"] = float(np.mean(list(flow_model.seconds.values())))
        atomic_write_text(path, json.dumps(row, indent=2) + "\n")
        rows[name] = row
    lines = [f"`{command}` ({size}^3 labels; network at {size // args.factor}^3)", "",
             "| row | pairs | Dice | Jaccard | folding % | s/pair |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| `{name}` | {r['pairs']} | {r['dice']:.3f} | {r['jacc']:.3f} | "
              f"{r['fold']:.3f} | {r['seconds_per_pair']:.2f} |" for name, r in rows.items()]
    atomic_write_text(args.markdown, "\n".join(lines) + "\n")
    atomic_write_text(args.json, json.dumps({"command": command, "rows": rows}, indent=2)
                      + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
