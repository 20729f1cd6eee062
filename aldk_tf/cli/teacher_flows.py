"""``aldk-teacher-flows``: store a teacher's final flows of every training pair (for ALDK).

    aldk-teacher-flows -c weights/<teacher run> [-d data.json] [--batch B] [--refine N]
    aldk-teacher-flows -c weights/<teacher run> --shard 2/3        # one machine's share
    aldk-teacher-flows -c weights/<teacher run> --merge            # then merge the parts

(:mod:`aldk_tf.training.teacher_flows`, the file: :mod:`aldk_tf.training.flow_store`.)
Also ``python -m aldk_tf.cli.teacher_flows``. Parsing the flags imports no TensorFlow
(``--help`` answers at once); its start-up log lines are hidden unless ``--verbose``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from aldk_tf.config import MAX_REP
from aldk_tf.shards import Shard, ShardError, find_parts
from aldk_tf.training.flow_store import (check_flow_file, flows_path, flows_stem,
                                         merge_teacher_flows, missing_pairs, open_flow_file,
                                         pair_key, provenance, refine_setting,
                                         refinement_summary, set_aside_if_stale,
                                         stored_keys)
from aldk_tf.refine_options import add_arguments as add_refine_arguments
from aldk_tf.training.runs import RunError


def main(argv=None) -> int:
    """``aldk-teacher-flows``: extract (a shard of) the teacher flows, or
    merge the shards; one-line errors, exit code 2."""
    parser = argparse.ArgumentParser(
        description="Store a teacher's final flows of every training pair (for ALDK).")
    parser.add_argument("-c", "--checkpoint", "--teacher", dest="checkpoint", required=True,
                        help="teacher run directory, weights/<run> (--teacher: old name)")
    parser.add_argument("-d", "--dataset", help="dataset JSON whose training pairs to "
                        "extract (default: the teacher run's)")
    parser.add_argument("--shard", help="extract only shard i/n of the pairs (1-based, "
                        "every n-th pair) into teacher_flows.shard-i-of-n.h5")
    parser.add_argument("--merge", action="store_true", help="merge the shard files into "
                        "teacher_flows.h5 (then removed unless --keep-parts)")
    parser.add_argument("--keep-parts", "--keep_parts", action="store_true")
    parser.add_argument("--batch", type=int, default=1, help="pairs per teacher call")
    parser.add_argument("--teacher-rep", "--teacher_rep", dest="teacher_rep", type=int,
                        default=0, help="apply the teacher's cascades R times with shared "
                        "weights (RCN's test-time recursion; default: as trained)")
    add_refine_arguments(parser, "store each teacher flow refined by")
    parser.add_argument("--verbose", action="store_true", help="show TensorFlow's log "
                        "lines")
    args = parser.parse_args(argv)
    from aldk_tf.console import import_tensorflow
    import_tensorflow(args.verbose)
    from aldk_tf.training.teacher_flows import extract_teacher_flows
    from aldk_tf.training import runs
    from aldk_tf.data import TRAINING_SCHEME, DataError, list_pairs, load_dataset_config
    try:
        if args.merge and args.shard:
            raise ShardError("--merge and --shard exclude each other")
        shard = Shard.parse(args.shard) if args.shard else None
        if args.batch < 1:
            raise RunError(f"--batch: expected an integer >= 1, got {args.batch}")
        refine_setting(args.refine, args.refine_lr)          # a bad value fails first
        if not 0 <= args.teacher_rep <= MAX_REP:
            raise RunError(f"--teacher-rep: expected R in 0..{MAX_REP}, got "
                           f"{args.teacher_rep}")
        teacher_config = runs.load_run_config(args.checkpoint)
        rep = args.teacher_rep or teacher_config.model.rep
        dataset_config = load_dataset_config(args.dataset or teacher_config.dataset)
        pairs = list_pairs(dataset_config, TRAINING_SCHEME)
        path = flows_path(args.checkpoint, refine=args.refine, rep=rep)
        if args.merge:
            parts = find_parts(args.checkpoint, *flows_stem(args.refine, rep))
            copied = merge_teacher_flows(path, parts)
            missing = missing_pairs(path, pairs)
            if missing:
                raise RunError(f"{path}: {len(missing)} of {len(pairs)} pairs still "
                               f"missing after the merge (e.g. {pair_key(*missing[0])}); "
                               f"finish the shards and merge again")
            if not args.keep_parts:
                for part in parts:
                    os.remove(part)
            print(f"merged {len(parts)} parts ({copied} flows) into {path}")
            return 0
        if tuple(teacher_config.model.image_size) != tuple(dataset_config.image_size):
            raise RunError(f"{args.checkpoint}: teacher image size "
                           f"{tuple(teacher_config.model.image_size)} differs from "
                           f"{dataset_config.where}'s {tuple(dataset_config.image_size)}")
        check_flow_file(path, args.refine, args.refine_lr)
        _, teacher = runs.load_model(args.checkpoint, rep=rep)
        fingerprints = provenance(teacher, dataset_config, pairs)   # all training pairs
        reason = set_aside_if_stale(path, fingerprints)
        if reason is not None:
            print(f"{path}: {reason}; moved to {path}.stale", file=sys.stderr)
        if shard is not None:
            done = stored_keys(path)
            pairs = [pair for pair in shard.select(pairs) if pair_key(*pair) not in done]
            path = flows_path(args.checkpoint, shard, args.refine, rep)
            open_flow_file(path).close()               # exists even when it has nothing to do
        count = extract_teacher_flows(teacher, dataset_config, pairs, path, args.batch,
                                      refine=args.refine,
                                      refine_learning_rate=args.refine_lr,
                                      fingerprints=fingerprints)
        print(f"{count} flows extracted into {path}")
        if os.path.exists(path):
            summary = refinement_summary(path, [pair_key(*pair) for pair in pairs])
            print(json.dumps({key: None if isinstance(value, float) and np.isnan(value)
                              else value for key, value in summary.items()}))
        return 0
    except (RunError, DataError, ShardError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
