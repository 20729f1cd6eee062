"""Rows on the held-out test pairs of a long run's dataset: ``python bench/heldout_eval.py``.

The test pairs of ``<out>/data/demo.json`` (built by :mod:`bench.long_train` from another
template than the generator's: brains no training pair came from), scored with the same
metrics for every row:

- ``before``: no registration;
- ``<run>``: each run under ``<out>/weights`` given by ``--runs``, at its best validation
  weights (``best.weights.h5``), alone (``<run>@R``: its cascade applied ``R`` times);
  each ``--savedmodels NAME=PATH`` export likewise;
- ``<run>+refine<N>``: the same, then ``N`` test-time refinement steps per pair
  (``--refine``);
- ``syn``: ANTs SyN (affine + deformable, antspyx defaults) on the same arrays, run by
  ``--ants-python`` (an environment with antspyx; ``bench/ants_syn.py``), its composed
  forward field scored as a flow; seconds per pair are the registration's own.

Writes ``--json`` and ``--markdown`` (Dice, share of SyN's gain over ``before``, Jaccard,
folding %, seconds per pair) after every row; finished rows are read back from
``<out>/evaluate``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
import tempfile

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(HERE) not in sys.path:
    sys.path.insert(0, os.path.dirname(HERE))

from aldk_tf.config import atomic_write_text  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="long_64", help="the long run's work folder")
    parser.add_argument("--runs", nargs="*", default=[], metavar="NAME[@REP]",
                        help="run names under weights/ (@REP: a cascade applied REP times)")
    parser.add_argument("--savedmodels", nargs="*", default=[], metavar="NAME=PATH",
                        help="exported models (SavedModel version folders) as rows")
    parser.add_argument("--refine", type=int, nargs="*", default=[50])
    parser.add_argument("--ants-python", help="python of an environment with antspyx "
                        "(default: no syn row)")
    parser.add_argument("--scheme", default="test")
    parser.add_argument("--json", default=os.path.join(HERE, "results", "heldout-64.json"))
    parser.add_argument("--markdown", default=os.path.join(HERE, "results", "heldout-64.md"))
    return parser.parse_args(argv)


class Identity:
    def __call__(self, fixed, moving):
        return {"flow": np.zeros(fixed.shape[:4] + (3,), np.float32)}


class AntsSyN:
    """``(fixed, moving) -> {"flow"}`` by ANTs SyN in another environment; remembers each
    pair's flow (the evaluation's warm-up call is not run twice) and its seconds."""

    def __init__(self, python: str):
        self.python, self.cache, self.seconds = python, {}, {}

    def __call__(self, fixed, moving):
        flows = [self.one(f[..., 0], m[..., 0]) for f, m in zip(fixed, moving)]
        return {"flow": np.stack(flows)}

    def one(self, fixed, moving):
        key = hashlib.sha1(fixed.tobytes() + moving.tobytes()).hexdigest()
        if key not in self.cache:
            with tempfile.TemporaryDirectory() as folder:
                np.save(os.path.join(folder, "fixed.npy"), fixed)
                np.save(os.path.join(folder, "moving.npy"), moving)
                subprocess.run([self.python, os.path.join(HERE, "ants_syn.py"), folder],
                               check=True, capture_output=True)
                self.cache[key] = np.load(os.path.join(folder, "flow.npy"))
                with open(os.path.join(folder, "seconds.json")) as handle:
                    self.seconds[key] = json.load(handle)["seconds"]
        return self.cache[key]


def evaluate_row(args, name: str, model, dataset_config, refine: int = 0) -> dict:
    from aldk_tf.data import list_pairs
    from aldk_tf.evaluation import evaluate_pairs
    path = os.path.join(os.path.abspath(args.out), "evaluate", f"{name}-{args.scheme}.json")
    if os.path.exists(path):
        with open(path) as handle:
            return json.load(handle)
    pairs = list_pairs(dataset_config, args.scheme)
    print(f"[heldout] {name} on {len(pairs)} {args.scheme} pairs", file=sys.stderr)
    _, summary = evaluate_pairs(model, dataset_config, pairs, batch=1,
                                label_values=dataset_config.label_values, progress=False,
                                refine=refine)
    row = {"dice": summary["dice"]["mean"], "dice_std": summary["dice"]["std"],
           "jacc": summary["jacc"]["mean"], "fold": summary["folding_percent"]["mean"],
           "seconds_per_pair": summary["seconds"]["mean"], "pairs": len(pairs)}
    if isinstance(model, AntsSyN):
        row["seconds_per_pair"] = float(np.mean(list(model.seconds.values())))
    atomic_write_text(path, json.dumps(row, indent=2) + "\n")
    return row


def markdown(rows: dict, command: str) -> str:
    before, syn = rows.get("before", {}).get("dice"), rows.get("syn", {}).get("dice")
    lines = [f"`{command}`", "",
             "| row | Dice | share of SyN's gain | Jaccard | folding % | s/pair |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, row in rows.items():
        share = ""
        if before is not None and syn is not None and syn > before:
            share = f"{100 * (row['dice'] - before) / (syn - before):.0f} %"
        lines.append(f"| `{name}` | {row['dice']:.3f} | {share} | {row['jacc']:.3f} | "
                     f"{row['fold']:.3f} | {row['seconds_per_pair']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    from aldk_tf.data import load_dataset_config
    from aldk_tf.training import runs
    command = "python bench/heldout_eval.py " + shlex.join(sys.argv[1:] if argv is None
                                                         else argv)
    dataset_config = load_dataset_config(os.path.join(args.out, "data", "demo.json"))
    rows: dict[str, dict] = {}

    def write():
        for path, text in ((args.json, json.dumps({"command": command, "rows": rows},
                                                  indent=2) + "\n"),
                           (args.markdown, markdown(rows, command))):
            atomic_write_text(path, text)

    rows["before"] = evaluate_row(args, "before", Identity(), dataset_config)
    if args.ants_python:
        rows["syn"] = evaluate_row(args, "syn", AntsSyN(args.ants_python), dataset_config)
        write()
    from aldk_tf.deploy import serving
    def run_model(entry):            # NAME or NAME@REP (the cascade applied REP times)
        name, _, rep = entry.partition("@")
        return runs.load_model(os.path.join(args.out, "weights", name),
                               rep=int(rep) if rep else None, best=True)[1]

    models = [(entry, lambda e=entry: run_model(e)) for entry in args.runs]
    for entry in args.savedmodels:
        name, _, path = entry.partition("=")
        models.append((name, lambda p=path: serving.savedmodel_runner(p)))
    for name, load in models:
        model = load()
        rows[name] = evaluate_row(args, name, model, dataset_config)
        write()
        for steps in args.refine:
            rows[f"{name}+refine{steps}"] = evaluate_row(args, f"{name}+refine{steps}",
                                                         model, dataset_config, steps)
            write()
    write()
    print(markdown(rows, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
