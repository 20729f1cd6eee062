"""Range and path checks of ``aldk-train``'s flags, run before anything is created."""

from __future__ import annotations

import os
from pathlib import Path

from aldk_tf.config import MAX_REP

MAX_STEPS = 2 ** 62


def check_values(args) -> None:
    """ValueError naming the flag unless every value is in its range (checked before
    anything is created)."""
    at_least = (("-n/--n-cascades", args.n_cascades, 1), ("-r/--rep", args.rep, 1),
                ("--batch", args.batch, 1), ("--round", args.round, 1),
                ("--epochs", args.epochs, 1), ("--channels", args.channels, 1),
                ("--seed", args.seed, 0), ("--checkpoint-every", args.checkpoint_every, 1),
                ("--validate-every", args.validate_every, 0),
                ("--validation-pairs", args.validation_pairs, 0),
                ("--cpu-replicas", args.cpu_replicas, 1),
                ("--refine-targets", args.refine_targets, 0),
                ("--teacher-rep", args.teacher_rep, 0),
                ("--adv-period", args.adv_period, 1), ("--adv-until", args.adv_until, 0),
                ("--critic-period", args.critic_period, 1),
                ("--crd-anneal", args.crd_anneal, 0))
    for flag, value, lowest in at_least:
        if value < lowest:
            raise ValueError(f"{flag}: expected an integer >= {lowest}, got {value}")
    if args.round * args.epochs > MAX_STEPS:        # the step counter is an int64
        raise ValueError(f"--round {args.round} x --epochs {args.epochs}: expected at most "
                         f"{MAX_STEPS} steps")
    for flag, value in (("-r/--rep", args.rep), ("--teacher-rep", args.teacher_rep)):
        if value > MAX_REP:
            raise ValueError(f"{flag}: expected at most {MAX_REP} repetitions, got {value}")
    for flag, value in (("--max-steps", args.max_steps), ("--log-every", args.log_every),
                        ("--resolution-factor", args.resolution_factor)):
        if value is not None and value < 1:
            raise ValueError(f"{flag}: expected an integer >= 1, got {value}")
    if args.image_size and (len(args.image_size) not in (1, 3)
                            or min(args.image_size) < 1):
        raise ValueError(f"--image-size: expected one or three sizes >= 1, got "
                         f"{' '.join(map(str, args.image_size))}")
    for flag, value in (("--lr", args.lr), ("--critic-lr", args.critic_lr)):
        if not 0.0 < value < float("inf"):
            raise ValueError(f"{flag}: expected a finite learning rate > 0, got {value}")
    for flag, value, highest in (("--beta", args.beta, 1.0), ("--gamma", args.gamma, 1.0),
                                 ("--lamb", args.lamb, float("inf")),
                                 ("--flow-distill", args.flow_distill, float("inf")),
                                 ("--clip-norm", args.clip_norm, float("inf")),
                                 ("--crd-flow-weight", args.crd_flow_weight, float("inf")),
                                 ("--crd-feature-weight", args.crd_feature_weight,
                                  float("inf"))):
        if not 0.0 <= value <= highest or value == float("inf"):
            bound = "a finite value >= 0" if highest == float("inf") else \
                f"a value in [0, {highest:g}]"
            raise ValueError(f"{flag}: expected {bound}, got {value}")


def check_paths(args) -> None:
    """ValueError naming the flag unless ``--weights_dir`` is (or can become) a folder and
    ``--output`` names a run inside it (checked before anything is created)."""
    if args.checkpoint:
        if os.path.exists(args.checkpoint) and not os.path.isdir(args.checkpoint):
            raise ValueError(f"-c {args.checkpoint}: expected a run directory, found a file")
        return
    if os.path.exists(args.weights_dir) and not os.path.isdir(args.weights_dir):
        raise ValueError(f"--weights-dir {args.weights_dir}: expected a folder for the run "
                         "directories, found a file")
    if args.output is not None:
        parts = Path(args.output).parts
        if (not parts or os.path.isabs(args.output) or ".." in parts
                or Path(args.output).name in ("", ".")):
            raise ValueError(f"--output {args.output}: expected a run name (a relative "
                             f"path without '..', created inside --weights-dir "
                             f"{args.weights_dir}); to choose the folder use --weights-dir")
        parent = os.path.join(args.weights_dir, args.output)
        while parent and not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if parent and not os.path.isdir(parent):
            raise ValueError(f"--output {args.output}: {parent} is a file, not a folder")
