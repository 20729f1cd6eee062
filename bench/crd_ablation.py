"""What the cross-resolution student's training terms do, on a finished demo.

    python bench/crd_ablation.py --demo demo_run [--rows ROW,ROW,...] [--json PATH]

Trains extra students on the demo's data with its teacher and budget (the settings of
its ``student_crd`` run: steps, batch, learning rate, seed), each a variation of the
distillation terms, evaluates them on the demo's test pairs like the demo does, and
prints them next to the demo's own rows (``student``, ``student_distilled``,
``student_crd`` from ``DIR/results.json``), with the mean per-pair weight of the
distillation terms over the run (``crd_weight``: how often the gate was open, times the
anneal). Runs land in ``DIR/ablation/<row>`` and resume like any run; a finished row is
only evaluated again (no weight then).

Rows (factor 2 = the cross-resolution student, 1 = full resolution):

- ``crd_none``: factor 2, distillation weights 0 (similarity/regularisers only);
- ``crd_flow_only`` / ``crd_feature_only``: factor 2, one of the two terms;
- ``crd_gated`` / ``full_gated``: factor 2 / 1, ``--crd-gate teacher_better``;
- ``crd_anneal``: factor 2, weights decayed linearly to 0 over the run
  (``--crd-anneal`` = the run's steps).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from aldk_tf.training import runs  # noqa: E402
from aldk_tf.config import RunConfig, atomic_write_text  # noqa: E402

DEMO_ROWS = ("student", "student_distilled", "student_crd")


def variations(steps: int) -> dict[str, tuple[int, dict]]:
    """``{row: (resolution factor, CRDConfig changes)}``."""
    return {
        "crd_none": (2, {"flow_weight": 0.0, "feature_weight": 0.0}),
        "crd_flow_only": (2, {"feature_weight": 0.0}),
        "crd_feature_only": (2, {"flow_weight": 0.0}),
        "crd_gated": (2, {"gate": "teacher_better"}),
        "full_gated": (1, {"gate": "teacher_better"}),
        "crd_anneal": (2, {"anneal_steps": steps}),
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", required=True,
                        help="output folder of a finished `python -m aldk_tf.cli.demo`")
    parser.add_argument("--rows", help="comma-separated rows (default: all)")
    parser.add_argument("--json", help="write {row: {dice, ...}} here")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    demo = os.path.abspath(args.demo)
    reference_dir = os.path.join(demo, "weights", "student_crd")
    try:
        base = RunConfig.load(reference_dir)
        with open(os.path.join(demo, "results.json")) as handle:
            demo_results = json.load(handle)
    except (OSError, ValueError) as error:
        print(f"error: --demo {args.demo}: not a finished demo with a cross-resolution "
              f"student ({error})", file=sys.stderr)
        return 2
    steps = base.train.round * base.train.epochs
    table = variations(steps)
    names = [n.strip() for n in args.rows.split(",") if n.strip()] if args.rows \
        else list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        print(f"error: --rows: unknown {unknown} (known: {', '.join(table)})",
              file=sys.stderr)
        return 2

    from aldk_tf.data import load_dataset_config
    from aldk_tf.pipeline.demo import evaluate_runs
    from aldk_tf.training.run import train
    dataset_config = load_dataset_config(base.dataset)
    out = os.path.join(demo, "ablation")
    results = {}
    for name in names:
        factor, changes = table[name]
        config = dataclasses.replace(
            base, model=dataclasses.replace(base.model, resolution_factor=factor),
            crd=dataclasses.replace(base.crd, **changes))
        run_dir = os.path.join(out, name)
        started = time.perf_counter()
        print(f"training {name} ({steps} steps) in {run_dir}", file=sys.stderr, flush=True)
        history = train(config, run_dir, verbose=0)
        _, model = runs.load_model(run_dir)
        row = evaluate_runs(out, dataset_config, {name: (model, int(model.count_params()))})
        # Mean per-pair weight of the distillation terms over the run's last epoch (the
        # gate's open fraction x the anneal); None when the run was already finished.
        weight = (history or {}).get("crd_weight")
        results[name] = {**row[name], "factor": factor, "crd": dataclasses.asdict(
            config.crd), "crd_weight": None if not weight else float(weight[-1]),
            "seconds": time.perf_counter() - started}

    print(f"Dice on the demo's {base.model.image_size[0]}^3 test pairs, {steps} steps each "
          f"(teacher: {base.teacher.run})")
    print(f"{'row':26s} {'factor':>6s} {'Dice':>16s}  distillation")
    for name in DEMO_ROWS:
        if name in demo_results:
            r = demo_results[name]
            print(f"{name + ' (demo)':26s} {'':6s} {r['dice']:8.4f} ({r['dice_std']:.3f})")
    for name, r in results.items():
        crd = r["crd"]
        weight = "" if r["crd_weight"] is None else f", mean weight {r['crd_weight']:.2f}"
        print(f"{name:26s} {r['factor']:6d} {r['dice']:8.4f} ({r['dice_std']:.3f})  "
              f"flow {crd['flow_weight']:g}, feature {crd['feature_weight']:g}, "
              f"gate {crd['gate']}, anneal {crd['anneal_steps']}{weight}")
    if args.json:
        atomic_write_text(args.json, json.dumps(
            {"demo": {n: demo_results.get(n) for n in DEMO_ROWS}, "ablation": results},
            indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
