"""Where a student's flow differs from its stored teacher targets: brain vs background.

    python bench/flow_mismatch.py --study study_64 [--rows student,student_flow_distill]
        [--pairs 12] [--flows teacher_flows-rep3.h5]

For every ``--pairs``-th training pair of a finished ``bench/study.py`` run (un-augmented:
the stored targets are of the raw pairs), the mean squared difference (voxels²) between
each row's flow and the stored teacher flow, inside the fixed image's brain (intensity >
0.05) and outside it, beside the targets' own mean squared size. This is how the study
found that plain flow distillation spends itself on background flows.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import h5py  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from aldk_tf.data import list_pairs, load_dataset_config, load_pair  # noqa: E402
from aldk_tf.training import runs  # noqa: E402
from aldk_tf.training.flow_store import pair_key  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", required=True, help="bench/study.py --out folder")
    parser.add_argument("--rows", default="student,student_flow_distill,"
                                          "student_warp_distill")
    parser.add_argument("--pairs", type=int, default=12, help="training pairs to use")
    parser.add_argument("--flows", default="teacher_flows-rep3.h5",
                        help="flow file in the study's teacher run")
    args = parser.parse_args(argv)
    config = load_dataset_config(os.path.join(args.study, "data", "demo.json"))
    pairs = list_pairs(config, "1")
    pairs = pairs[::max(len(pairs) // max(args.pairs, 1), 1)][:args.pairs]
    path = os.path.join(args.study, "weights", "teacher", args.flows)
    rows = {}
    try:
        for name in args.rows.split(","):
            model = runs.load_model(os.path.join(args.study, "weights", name))[1]
            rows[name] = tf.function(model.registration_model())
        flows = h5py.File(path, "r")
    except (runs.RunError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    sums = {name: [] for name in rows}
    with flows:
        for fixed_id, moving_id in pairs:
            pair = load_pair(config, fixed_id, moving_id)
            inputs = {key: pair[key][None].astype(np.float32) for key in ("fixed", "moving")}
            target = np.asarray(flows[pair_key(fixed_id, moving_id)], np.float32)
            brain = pair["fixed"][..., 0] > 0.05
            size = (target ** 2).sum(-1)
            for name, register in rows.items():
                error = ((register(inputs)["flow"].numpy()[0] - target) ** 2).sum(-1)
                sums[name].append((error[brain].mean(), error[~brain].mean(),
                                   size[brain].mean(), size[~brain].mean()))
    print(f"{len(pairs)} training pairs; mean squared flow difference to {args.flows} "
          "(voxels²)")
    print("| row | brain | background | targets' size: brain | background |")
    print("|---|---|---|---|---|")
    for name, values in sums.items():
        brain_error, background_error, brain_size, background_size = np.mean(values, 0)
        print(f"| `{name}` | {brain_error:.2f} | {background_error:.2f} | {brain_size:.2f} | "
              f"{background_size:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
