"""Build the embedded demo dataset from nilearn's MNI152 template, offline.

    python data_prep/build_demo.py --out datasets --size 64 --seed 0

writes ``OUT/demo.h5`` and ``OUT/demo.json`` (RCN layout; subsets demo-train / demo-val /
demo-test, schemes "1", "2", "test"; labels 1 CSF, 2 GM, 3 WM; six landmarks per scan).
Deterministic for a given --size and --seed. See ``aldk_tf/data/demo_set.py``.

Installed, the same tool is the console script ``aldk-build-demo``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from aldk_tf.data import DataError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="datasets", help="output folder (default datasets)")
    parser.add_argument("--size", type=int, default=64, help="cubic size (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--subjects", type=int, default=20, help="number of subjects")
    parser.add_argument("--val", type=int, default=4, help="validation subjects")
    parser.add_argument("--test", type=int, default=4, help="test subjects")
    parser.add_argument("--same-anatomy", action="store_true",
                        help="every subject a warp of the one template (default: every "
                             "subject a different brain)")
    parser.add_argument("--heldout-t1", help="skull-stripped T1 in MNI space the test "
                        "subjects are built from (a held-out anatomy)")
    parser.add_argument("--group-size", type=int, default=0,
                        help="split the training subjects into subsets of this many; "
                             "training pairs are drawn within a subset (default 0: one "
                             "subset, all ordered pairs)")
    parser.add_argument("--nifti", metavar="DIR", help="also write two test subjects as "
                        "NIfTI (T1 + labels) into DIR, to try register on")
    parser.add_argument("--verbose", action="store_true", help="show TensorFlow's log "
                        "lines")
    args = parser.parse_args(argv)
    from aldk_tf.console import import_tensorflow
    import_tensorflow(args.verbose)
    from aldk_tf.data.demo_set import build_demo, summary, write_nifti_subjects
    start = time.perf_counter()
    try:
        if args.seed < 0:
            raise ValueError(f"--seed: expected an integer >= 0, got {args.seed}")
        for flag, folder in (("--out", args.out), ("--nifti", args.nifti)):
            if folder and os.path.exists(folder) and not os.path.isdir(folder):
                raise ValueError(f"{flag} {folder}: exists and is not a folder")
        path = build_demo(args.out, size=args.size, seed=args.seed, subjects=args.subjects,
                          validation=args.val, test=args.test,
                          vary=not args.same_anatomy, test_template=args.heldout_t1,
                          group_size=args.group_size)
        if args.nifti:
            for written in write_nifti_subjects(path, args.nifti):
                print(written)
    except (DataError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{summary(path)} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
