"""Train a teacher (affine + VTN/VoxelMorph cascades) or a student (with or without ALDK).

Flags follow the original releases (-b, -n, -r, -c, -d, --batch, --round, --epochs,
--output, --lr, --aldk, --beta, --gamma, --lamb). Runs land in weights/<output>/ with
config.json, model.weights.h5, checkpoints/ and logs/ (TensorBoard).

  python train.py -b VTN -n 3 -d datasets/demo.json --output teacher
  python train.py -b LDR -n 1 -d datasets/demo.json --output student
  python train.py -b LDR -n 1 -d datasets/demo.json --aldk --teacher weights/teacher \\
      --output student_aldk
  python train.py -c weights/student_aldk          # resume where it stopped

Several devices: -g 0,1,2,3 trains under MirroredStrategy on those GPUs, splitting each
--batch (the global batch) across them; -g -1 uses the CPU only. Several machines: the
same command on every machine with --strategy multiworker and each machine's TF_CONFIG.

Installed, the same tool is the console script aldk-train (same flags, any directory).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys

BASES = {"vtn": ("teacher", "vtn", "vtn"), "voxelmorph": ("teacher", "voxelmorph", "vtn"),
         "ldr": ("student", "student", "student")}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-b", "--base_network", default="VTN",
                        help="VTN or VoxelMorph (teacher cascades) or LDR (student)")
    parser.add_argument("-n", "--n_cascades", type=int, default=1)
    parser.add_argument("-r", "--rep", type=int, default=1,
                        help="shared-weight repetitions of every cascade")
    parser.add_argument("-c", "--checkpoint", help="resume the run in this directory")
    parser.add_argument("-d", "--dataset", help="dataset JSON (RCN layout)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--round", type=int, default=20000, help="steps per epoch")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--output", help="run name under weights/ (default: a timestamp)")
    parser.add_argument("--weights_dir", default="weights")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--schedule", default="auto",
                        choices=("auto", "step", "cosine", "constant"))
    parser.add_argument("--image_size", type=int, nargs="+",
                        help="one or three sizes; default: the dataset's image_size")
    parser.add_argument("--student_variant", default="seed", choices=("seed", "release"))
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no_augment", action="store_true",
                        help="no random free-form augmentation of the moving image")
    parser.add_argument("--augment-field", "--augment_field", dest="augment_field",
                        default="bspline", choices=("bspline", "spline"),
                        help="augmentation field: the RCN release's zero-padded cubic "
                             "B-spline (default) or a natural spline through the control "
                             "values (about 2.5x stronger)")
    parser.add_argument("--clip-norm", "--clip_norm", dest="clip_norm", type=float,
                        default=0.0, help="clip the gradients' global norm to this "
                        "(0: off); cuts rare spikes without changing ordinary steps")
    parser.add_argument("--checkpoint_every", type=int, default=500)
    parser.add_argument("--validate_every", type=int, default=1000)
    parser.add_argument("--validation_pairs", type=int, default=16)
    parser.add_argument("--max_steps", type=int,
                        help="stop at this global step (the run can be resumed later)")
    devices = parser.add_argument_group("devices (--batch is the global batch, split "
                                        "across replicas)")
    devices.add_argument("-g", "--gpu", help="GPU ids as in the release, e.g. 0 or 0,1,2,3 "
                         "(MirroredStrategy over them), or -1 for the CPU only; default: "
                         "TensorFlow's default device, no strategy")
    devices.add_argument("--strategy", default="auto",
                         choices=("auto", "mirrored", "multiworker"),
                         help="auto: mirrored when several devices are given; multiworker: "
                              "MultiWorkerMirroredStrategy configured by TF_CONFIG (run the "
                              "same command on every worker)")
    devices.add_argument("--cpu_replicas", type=int, default=1,
                         help="mirror over this many logical CPU devices of this host "
                              "(testing and CPU-only rehearsal of a multi-GPU run)")
    aldk = parser.add_argument_group("ALDK (student only)")
    aldk.add_argument("--aldk", action="store_true", help="adversarial distillation")
    aldk.add_argument("--teacher", help="teacher run directory, weights/<run>")
    aldk.add_argument("--teacher_online", action="store_true",
                      help="run the frozen teacher on every (augmented) batch instead of "
                           "using stored teacher flows")
    aldk.add_argument("--flow-distill", "--flow_distill", dest="flow_distill", type=float,
                      default=0.0, metavar="W",
                      help="add W * mean |student flow - teacher flow|^2 (plain flow "
                           "distillation from the stored teacher flows; without --aldk "
                           "there is no critic)")
    aldk.add_argument("--teacher-rep", "--teacher_rep", dest="teacher_rep", type=int,
                      default=0, metavar="R",
                      help="apply the teacher's cascades R times with shared weights "
                           "(RCN's test-time recursion) for its targets; default: as "
                           "the teacher was trained")
    aldk.add_argument("--refine-targets", "--refine_targets", dest="refine_targets",
                      type=int, default=0, metavar="N",
                      help="distil from teacher flows refined by N instance-optimisation "
                           "steps per training pair (stored once beside the teacher)")
    aldk.add_argument("--beta", type=float, default=0.1)
    aldk.add_argument("--gamma", type=float, default=0.3)
    aldk.add_argument("--lamb", type=float, default=0.1)
    aldk.add_argument("--critic_lr", type=float, default=1e-4)
    aldk.add_argument("--critic_output", default="sigmoid", choices=("sigmoid", "raw"),
                      help="critic score squashed by a sigmoid (default, stable) or raw")
    aldk.add_argument("--adv_period", type=int, default=3,
                      help="adversarial term on every k-th step")
    aldk.add_argument("--adv_until", type=int, default=8000,
                      help="adversarial term only before this step")
    aldk.add_argument("--critic_period", type=int, default=3,
                      help="critic update on every k-th step (before --adv_until)")
    crd = parser.add_argument_group("cross-resolution student (seed 002)")
    crd.add_argument("--crd", action="store_true",
                     help="distil a low-resolution student from the full-resolution "
                          "--teacher (flow + feature-shifted-teacher feature terms)")
    crd.add_argument("--resolution_factor", type=int, default=None,
                     help="run the student on the pair downsampled by this factor "
                          "(default 2 with --crd, else 1)")
    crd.add_argument("--crd_flow_weight", type=float, default=0.1)
    crd.add_argument("--crd_feature_weight", type=float, default=0.05)
    crd.add_argument("--crd_gate", choices=("always", "teacher_better"),
                     default="always",
                     help="distil every pair (default), or only pairs the teacher "
                          "registers better than the student (lower similarity loss)")
    crd.add_argument("--crd_anneal", type=int, default=0, metavar="STEPS",
                     help="decay the distillation weights linearly to 0 by this step "
                          "(0: constant)")
    parser.add_argument("-v", "--verbose", type=int, default=None,
                        help="Keras verbosity (default: progress bar on a terminal)")
    return parser.parse_args(argv)


def build_config(args):
    from aldk_tf.config import ALDKConfig, CRDConfig, ModelConfig, RunConfig, TrainConfig
    from aldk_tf.data import load_dataset_config
    base = args.base_network.lower()
    if base not in BASES:
        raise ValueError(f"-b/--base_network: expected VTN, VoxelMorph or LDR, got "
                         f"{args.base_network!r}")
    if not args.dataset:
        raise ValueError("-d/--dataset: a dataset JSON is required for a new run")
    role, network, affine = BASES[base]
    dataset_config = load_dataset_config(args.dataset)
    image_size = tuple(dataset_config.image_size)
    if args.image_size:
        wanted = tuple(args.image_size * 3 if len(args.image_size) == 1 else args.image_size)
        if wanted != image_size:
            raise ValueError(f"--image_size {wanted} differs from {args.dataset}'s "
                             f"image_size {image_size}; prepare the data at that size")
    if not 0.0 <= args.flow_distill < float("inf"):
        raise ValueError(f"--flow-distill: expected a finite weight >= 0, got "
                         f"{args.flow_distill}")
    for flag, used in (("--aldk", args.aldk), ("--flow-distill", args.flow_distill),
                       ("--crd", args.crd)):
        if used and role != "student":
            raise ValueError(f"{flag} applies to the student (-b LDR)")
        if used and not args.teacher:
            raise ValueError(f"{flag} needs --teacher weights/<teacher run>")
    if not 0.0 <= args.clip_norm < float("inf"):
        raise ValueError(f"--clip-norm: expected a finite value >= 0, got {args.clip_norm}")
    if args.refine_targets < 0:
        raise ValueError(f"--refine-targets: expected N >= 0, got {args.refine_targets}")
    if args.teacher_rep < 0:
        raise ValueError(f"--teacher-rep: expected R >= 0, got {args.teacher_rep}")
    factor = args.resolution_factor or (2 if args.crd else 1)
    teacher = os.path.abspath(args.teacher) if args.teacher else None
    return RunConfig(
        dataset=os.path.abspath(args.dataset),
        preprocessing=dataset_config.extra.get("preprocessing"),
        model=ModelConfig(role=role, base=network, n_cascades=args.n_cascades,
                          rep=args.rep, affine=affine, channels=args.channels,
                          student_variant=args.student_variant, image_size=image_size,
                          resolution_factor=factor),
        train=TrainConfig(batch=args.batch, round=args.round, epochs=args.epochs,
                          lr=args.lr, seed=args.seed, augment=not args.no_augment,
                          checkpoint_every=args.checkpoint_every,
                          validate_every=args.validate_every,
                          validation_pairs=args.validation_pairs, schedule=args.schedule,
                          augment_field=args.augment_field, clip_norm=args.clip_norm),
        aldk=ALDKConfig(enabled=args.aldk, beta=args.beta, gamma=args.gamma,
                        lamb=args.lamb, critic_lr=args.critic_lr,
                        critic_output=args.critic_output,
                        adversarial_period=args.adv_period,
                        adversarial_until=args.adv_until,
                        critic_period=args.critic_period, teacher=teacher,
                        teacher_online=args.teacher_online,
                        flow_weight=args.flow_distill, refine=args.refine_targets,
                        teacher_rep=args.teacher_rep),
        crd=CRDConfig(enabled=args.crd, flow_weight=args.crd_flow_weight,
                      feature_weight=args.crd_feature_weight, gate=args.crd_gate,
                      anneal_steps=args.crd_anneal,
                      teacher=teacher, teacher_rep=args.teacher_rep))


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from aldk_tf import distribute, runs
    from aldk_tf.data import DataError
    try:
        # Devices and the strategy first: TensorFlow must not have started yet.
        strategy = distribute.make_strategy(args.gpu, args.strategy, args.cpu_replicas)
        if distribute.is_multi_worker(strategy) and not (args.checkpoint or args.output):
            raise ValueError("--strategy multiworker needs --output (or -c): every "
                             "worker must name the same run")
        from aldk_tf.train_run import train
        if args.checkpoint:
            run_dir = args.checkpoint
            config = runs.load_run_config(run_dir)
        else:
            config = build_config(args)
            name = args.output or datetime.datetime.now().strftime(
                f"%b%d-%H%M_{args.base_network}{args.n_cascades}")
            run_dir = os.path.join(args.weights_dir, name)
            if (distribute.is_chief(strategy)
                    and os.path.exists(os.path.join(run_dir, "config.json"))):
                raise ValueError(f"{run_dir}: a run already exists here; resume it with "
                                 f"-c {run_dir} or choose another --output")
        verbose = args.verbose if args.verbose is not None else (
            "auto" if sys.stderr.isatty() else 2)
        print(f"run directory: {run_dir}", file=sys.stderr)
        if strategy.num_replicas_in_sync > 1:
            print(f"{type(strategy).__name__}: {strategy.num_replicas_in_sync} replicas, "
                  f"global batch {config.train.batch}", file=sys.stderr)
        train(config, run_dir, verbose=verbose, max_steps=args.max_steps,
              strategy=strategy)
    except (DataError, runs.RunError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"weights: {runs.weights_path(run_dir)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
