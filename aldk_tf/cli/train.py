"""Train a teacher (affine + VTN/VoxelMorph cascades) or a student (with or without ALDK).

Flags follow the original releases (-b, -n, -r, -c, -d, --batch, --round, --epochs,
--output, --lr, --aldk, --beta, --gamma, --lamb). Runs land in weights/<output>/ with
config.json, model.weights.h5, checkpoints/ and logs/ (TensorBoard).

  python train.py -b VTN -n 3 -d datasets/demo.json --output teacher
  python train.py -b LDR -n 1 -d datasets/demo.json --output student
  python train.py -b LDR -n 1 -d datasets/demo.json --aldk --teacher weights/teacher \\
      --output student_aldk
  python train.py -c weights/student_aldk          # resume where it stopped
  python train.py -c weights/student_aldk --epochs 8   # longer (recorded in config.json)

A run directory is locked while it trains (a second start on it stops), a failed start
leaves none behind, and a resumed run refuses flags that change what it trains unless
--override is given (then the change is recorded in its config.json). docs/faults.md
lists what happens on each bad input or fault.

Several devices: -g 0,1,2,3 trains under MirroredStrategy on those GPUs, splitting each
--batch (the global batch) across them; -g -1 uses the CPU only. Several machines: the
same command on every machine with --strategy multiworker and each machine's TF_CONFIG.

Installed, the same tool is the console script aldk-train (same flags, any directory).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import sys

from aldk_tf.deploy.cpu import training_precision
from aldk_tf.cli.train_checks import check_paths, check_values
from aldk_tf.networks.bases import BASES as NETWORKS
from aldk_tf.networks.bases import STUDENT_VARIANTS, student_variant_name

#: ``-b`` (lower case) -> (model.role, model.base, model.affine); the inverse of BASE_FLAGS.
BASES = {spec.flag.lower(): (spec.role, base, spec.affine) for base, spec in NETWORKS.items()}
#: The -b value that builds each stored model.base.
BASE_FLAGS = {base: spec.flag for base, spec in NETWORKS.items()}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-b", "--base-network", "--base_network", default="VTN",
                        help=", ".join(f"{spec.flag} ({spec.role})"
                                       for spec in NETWORKS.values()))
    parser.add_argument("-n", "--n-cascades", "--n_cascades", type=int, default=1)
    parser.add_argument("-r", "--rep", type=int, default=1,
                        help="shared-weight repetitions of every cascade")
    parser.add_argument("-c", "--checkpoint", help="resume the run in this directory "
                        "(flags that change its settings are refused without --override; "
                        "--epochs, --checkpoint-every, --validate-every and "
                        "--validation-pairs are applied and recorded in its config.json)")
    parser.add_argument("--override", action="store_true",
                        help="with -c: apply flags that change what the run trains, and "
                             "record the change in its config.json (history)")
    parser.add_argument("-d", "--dataset", help="dataset JSON (RCN layout)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--round", type=int, default=20000, help="steps per epoch")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--output", help="run name under weights/ (default: a timestamp)")
    parser.add_argument("--weights-dir", "--weights_dir", default="weights")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--schedule", default="auto",
                        choices=("auto", "step", "cosine", "constant"))
    parser.add_argument("--image-size", "--image_size", type=int, nargs="+",
                        help="one or three sizes; default: the dataset's image_size")
    parser.add_argument("--student-variant", "--student_variant", default="paper",
                        type=student_variant_name, choices=STUDENT_VARIANTS,
                        help="the student's decoder: the paper's (transposed convs; "
                             "'seed' is its earlier name) or the released code's")
    parser.add_argument("--channels", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-augment", "--no_augment", action="store_true",
                        help="no random free-form augmentation of the moving image")
    parser.add_argument("--augment-field", "--augment_field", dest="augment_field",
                        default="bspline", choices=("bspline", "spline"),
                        help="augmentation field: the RCN release's zero-padded cubic "
                             "B-spline (default) or a natural spline through the control "
                             "values (about 2.5x stronger)")
    parser.add_argument("--clip-norm", "--clip_norm", dest="clip_norm", type=float,
                        default=0.0, help="clip the gradients' global norm to this "
                        "(0: off); cuts rare spikes without changing ordinary steps")
    parser.add_argument("--precision", default="auto",
                        choices=("auto", "float32", "bfloat16"),
                        help="bfloat16: mixed precision (feature layers in bfloat16; "
                             "variables, flows and losses float32), faster only where the "
                             "CPU has AMX or AVX512-BF16; auto (default): bfloat16 where it "
                             "has, else float32; the run records what it used "
                             "(docs/training.md)")
    parser.add_argument("--checkpoint-every", "--checkpoint_every", type=int, default=500)
    parser.add_argument("--validate-every", "--validate_every", type=int, default=1000)
    parser.add_argument("--validation-pairs", "--validation_pairs", type=int, default=16)
    parser.add_argument("--max-steps", "--max_steps", type=int,
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
    devices.add_argument("--cpu-replicas", "--cpu_replicas", type=int, default=1,
                         help="mirror over this many logical CPU devices of this host "
                              "(testing and CPU-only rehearsal of a multi-GPU run)")
    aldk = parser.add_argument_group("ALDK (student only)")
    aldk.add_argument("--aldk", action="store_true", help="adversarial distillation")
    aldk.add_argument("--teacher", help="teacher run directory, weights/<run>")
    aldk.add_argument("--teacher-online", "--teacher_online", action="store_true",
                      help="run the frozen teacher on every (augmented) batch instead of "
                           "using stored teacher flows")
    aldk.add_argument("--flow-distill", "--flow_distill", dest="flow_distill", type=float,
                      default=0.0, metavar="W",
                      help="add W * mean |student flow - teacher flow|^2 (plain flow "
                           "distillation from the stored teacher flows; without --aldk "
                           "there is no critic)")
    aldk.add_argument("--distill-target", "--distill_target", dest="distill_target",
                      choices=("flow", "warped", "warped_gated"), default="flow",
                      help="what --flow-distill compares: 'flow' (the squared flow "
                           "difference) or 'warped' (the similarity of the student's "
                           "warped image to the moving image warped by the teacher's "
                           "flow; W about 1); 'warped_gated': 'warped' only on the pairs "
                           "whose teacher-warped image is closer to the fixed one than "
                           "the student's")
    aldk.add_argument("--teacher-rep", "--teacher_rep", dest="teacher_rep", type=int,
                      default=0, metavar="R",
                      help="apply the teacher's cascades R times with shared weights "
                           "(RCN's test-time recursion) for its targets; default: as "
                           "the teacher was trained")
    aldk.add_argument("--refine-targets", "--refine_targets", dest="refine_targets",
                      type=int, default=0, metavar="N",
                      help="distil from teacher flows refined by N instance-optimisation "
                           "steps per training pair (stored once beside the teacher; "
                           "with --generator: on every batch)")
    aldk.add_argument("--beta", type=float, default=0.1)
    aldk.add_argument("--gamma", type=float, default=0.3)
    aldk.add_argument("--lamb", type=float, default=0.1)
    aldk.add_argument("--critic-lr", "--critic_lr", type=float, default=1e-4)
    aldk.add_argument("--critic-output", "--critic_output", default="sigmoid",
                      choices=("sigmoid", "raw"),
                      help="critic score squashed by a sigmoid (default, stable) or raw")
    aldk.add_argument("--critic-input", "--critic_input", default="flow",
                      choices=("flow", "images"),
                      help="what the critic judges: the flow (the paper's) or the fixed "
                           "image beside the moving image warped by the flow")
    aldk.add_argument("--adv-period", "--adv_period", type=int, default=3,
                      help="adversarial term on every k-th step")
    aldk.add_argument("--adv-until", "--adv_until", type=int, default=8000,
                      help="adversarial term only before this step")
    aldk.add_argument("--critic-period", "--critic_period", type=int, default=3,
                      help="critic update on every k-th step (before --adv-until)")
    generated = parser.add_argument_group(
        "generated pairs (every step a new pair drawn from the template; the dataset then "
        "gives the validation pairs only)")
    generated.add_argument("--generator", choices=("synth", "real", "mixed"),
                           help="train on generated pairs: intensities synthesised per "
                                "label, the template's T1, or either per pair")
    generated.add_argument("--synth-fraction", "--synth_fraction", type=float,
                           help="with --generator mixed: share of synthesised pairs "
                                "(default 0.5)")
    generated.add_argument("--shapes", type=float,
                           help="share of pairs from random-shape label maps (default 0)")
    generated.add_argument("--label-weight", "--label_weight", type=float, default=0.0,
                           help="weight of the soft-Dice term on the warped label maps "
                                "(needs labelled pairs: --generator)")
    crd = parser.add_argument_group("cross-resolution student (CRD)")
    crd.add_argument("--crd", action="store_true",
                     help="distil a low-resolution student from the full-resolution "
                          "--teacher (flow + feature-shifted-teacher feature terms)")
    crd.add_argument("--resolution-factor", "--resolution_factor", type=int, default=None,
                     help="run the student on the pair downsampled by this factor "
                          "(default 2 with --crd, else 1)")
    crd.add_argument("--crd-flow-weight", "--crd_flow_weight", type=float, default=0.1)
    crd.add_argument("--crd-feature-weight", "--crd_feature_weight", type=float, default=0.05)
    crd.add_argument("--crd-gate", "--crd_gate", choices=("always", "teacher_better"),
                     default="always",
                     help="distil every pair (default), or only pairs the teacher "
                          "registers better than the student (lower similarity loss)")
    crd.add_argument("--crd-anneal", "--crd_anneal", type=int, default=0, metavar="STEPS",
                     help="decay the distillation weights linearly to 0 by this step "
                          "(0: constant)")
    parser.add_argument("--verbose", type=int, default=None,
                        help="Keras verbosity (default: progress bar on a terminal)")
    parser.add_argument("--log-every", "--log_every", dest="log_every", type=int,
                        default=None, metavar="N",
                        help="TensorBoard loss curves: the mean of every N steps, on the "
                             "global step (default: every step up to 400 steps, then "
                             "about 200 points per run, at least every 50 steps)")
    return parser


def parse_args(argv=None):
    return make_parser().parse_args(argv)


def given_flags(argv) -> set[str]:
    """The destinations of the flags written on the command line ``argv`` (whatever
    their value: ``--lr 1e-4`` is given even though it is the default)."""
    parser = make_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


#: The pair generator's settings (``aldk_tf.data.synth.GeneratorSettings``), as stored.
GENERATOR_SETTINGS = ("train.generator",) + tuple(
    f"train.generator.{name}" for name in (
        "source", "synth_fraction", "shapes", "shape_labels", "velocity_std", "control_grid",
        "max_rotation_deg", "max_scale", "max_shift", "tissue_log_std", "bias_std",
        "max_blur", "gamma_std", "texture_std", "max_noise"))
#: The settings (``aldk_tf.training.runs.settings`` keys) each flag sets: what a resumed run
#: compares with the settings it was trained with.
FLAG_SETTINGS = {
    "base_network": ("model.role", "model.base", "model.affine"),
    "n_cascades": ("model.n_cascades",), "rep": ("model.rep",), "dataset": ("dataset",),
    "batch": ("train.batch",), "round": ("train.round",), "epochs": ("train.epochs",),
    "lr": ("train.lr",), "schedule": ("train.schedule",),
    "image_size": ("model.image_size",), "student_variant": ("model.student_variant",),
    "channels": ("model.channels",), "seed": ("train.seed",),
    "no_augment": ("train.augment",), "augment_field": ("train.augment_field",),
    "clip_norm": ("train.clip_norm",), "precision": ("train.precision",),
    "checkpoint_every": ("train.checkpoint_every",),
    "validate_every": ("train.validate_every",),
    "validation_pairs": ("train.validation_pairs",),
    "aldk": ("aldk.enabled",), "teacher": ("teacher.run",),
    "teacher_online": ("aldk.teacher_online",), "flow_distill": ("aldk.flow_weight",),
    "distill_target": ("aldk.flow_target",),
    "refine_targets": ("aldk.refine",),
    "teacher_rep": ("teacher.rep",), "beta": ("aldk.beta",),
    "gamma": ("aldk.gamma",),
    "lamb": ("aldk.lamb",), "critic_lr": ("aldk.critic_lr",),
    "critic_output": ("aldk.critic_output",), "critic_input": ("aldk.critic_input",),
    "adv_period": ("aldk.adversarial_period",),
    "adv_until": ("aldk.adversarial_until",), "critic_period": ("aldk.critic_period",),
    "generator": GENERATOR_SETTINGS, "synth_fraction": GENERATOR_SETTINGS,
    "shapes": GENERATOR_SETTINGS, "label_weight": ("losses.label",),
    "crd": ("crd.enabled",), "resolution_factor": ("model.resolution_factor",),
    "crd_flow_weight": ("crd.flow_weight",), "crd_feature_weight": ("crd.feature_weight",),
    "crd_gate": ("crd.gate",), "crd_anneal": ("crd.anneal_steps",),
}
#: Flags that are no setting of the run (where and how long to run it now).
NOT_SETTINGS = {"checkpoint", "override", "output", "weights_dir", "max_steps", "gpu",
                "strategy", "cpu_replicas", "verbose", "log_every"}
#: Settings a resumed run may change without --override (a longer budget, bookkeeping);
#: the change is still recorded in the run's history.
BUDGET_SETTINGS = {"train.epochs", "train.checkpoint_every", "train.validate_every",
                   "train.validation_pairs"}


def build_config(args):
    """The RunConfig of a new run from parsed flags; ValueError naming a bad flag."""
    from aldk_tf.config import (ALDKConfig, CRDConfig, LossWeights, ModelConfig,
                                RunConfig, TeacherConfig, TrainConfig)
    from aldk_tf.data import load_dataset_config
    check_values(args)          # again: resumed_config and library callers come here directly
    base = args.base_network.lower()
    if base not in BASES:
        raise ValueError(f"-b/--base-network: expected one of "
                         f"{', '.join(BASE_FLAGS.values())}, got {args.base_network!r}")
    if not args.dataset:
        raise ValueError("-d/--dataset: a dataset JSON is required for a new run")
    role, network, affine = BASES[base]
    dataset_config = load_dataset_config(args.dataset)
    image_size = tuple(dataset_config.image_size)
    if args.image_size:
        wanted = tuple(args.image_size * 3 if len(args.image_size) == 1 else args.image_size)
        if wanted != image_size:
            raise ValueError(f"--image-size {wanted} differs from {args.dataset}'s "
                             f"image_size {image_size}; prepare the data at that size")
    for flag, used in (("--aldk", args.aldk), ("--flow-distill", args.flow_distill),
                       ("--crd", args.crd)):
        if used and role != "student":
            raise ValueError(f"{flag} applies to the student (-b {BASE_FLAGS['student']})")
    factor = args.resolution_factor or (2 if args.crd else 1)
    config = RunConfig(
        dataset=os.path.abspath(args.dataset),
        preprocessing=(generated_preprocessing(image_size) if args.generator else
                       dataset_config.extra.get("preprocessing")),
        model=ModelConfig(role=role, base=network, n_cascades=args.n_cascades,
                          rep=args.rep, affine=affine, channels=args.channels,
                          student_variant=args.student_variant, image_size=image_size,
                          resolution_factor=factor),
        train=TrainConfig(batch=args.batch, round=args.round, epochs=args.epochs,
                          lr=args.lr, seed=args.seed, augment=not args.no_augment,
                          checkpoint_every=args.checkpoint_every,
                          validate_every=args.validate_every,
                          validation_pairs=args.validation_pairs, schedule=args.schedule,
                          augment_field=args.augment_field, clip_norm=args.clip_norm,
                          generator=generator_settings(args),
                          precision=training_precision(args.precision)),
        losses=LossWeights(label=args.label_weight),
        aldk=ALDKConfig(enabled=args.aldk, beta=args.beta, gamma=args.gamma,
                        lamb=args.lamb, critic_lr=args.critic_lr,
                        critic_output=args.critic_output,
                        critic_input=args.critic_input,
                        adversarial_period=args.adv_period,
                        adversarial_until=args.adv_until,
                        critic_period=args.critic_period,
                        teacher_online=args.teacher_online,
                        flow_weight=args.flow_distill, refine=args.refine_targets,
                        flow_target=args.distill_target),
        crd=CRDConfig(enabled=args.crd, flow_weight=args.crd_flow_weight,
                      feature_weight=args.crd_feature_weight, gate=args.crd_gate,
                      anneal_steps=args.crd_anneal),
        teacher=TeacherConfig(run=os.path.abspath(args.teacher) if args.teacher else None,
                              rep=args.teacher_rep))
    config.check_teacher()
    return config


def generated_preprocessing(image_size) -> dict:
    """How generated pairs are prepared (the template's box, as the demo's scans): what
    register must reproduce on new scans for a model trained on them."""
    from aldk_tf.data.demo_set import preprocessing
    return preprocessing(int(image_size[0])).to_dict()


def generator_settings(args) -> dict | None:
    """The pair generator's settings of ``--generator`` (None without it); ValueError
    naming the flag when a value is out of range."""
    if args.label_weight < 0 or not args.label_weight < float("inf"):
        raise ValueError(f"--label-weight: expected a finite weight >= 0, got "
                         f"{args.label_weight}")
    given = [(flag, value) for flag, value in (("--label-weight", args.label_weight),
                                                ("--synth-fraction", args.synth_fraction),
                                                ("--shapes", args.shapes)) if value]
    if args.generator is None:
        if given:
            raise ValueError(f"{given[0][0]} applies to generated pairs (the label term "
                             f"needs their labels): add --generator")
        return None
    from aldk_tf.data.synth import GeneratorSettings
    defaults = GeneratorSettings()
    shares = {"synth_fraction": (args.synth_fraction, defaults.synth_fraction),
              "shapes": (args.shapes, defaults.shapes)}
    for name, (value, _) in shares.items():
        if value is not None and not 0.0 <= value <= 1.0:
            raise ValueError(f"--{name.replace('_', '-')}: expected a share in [0, 1], "
                             f"got {value}")
    return GeneratorSettings(source=args.generator, **{
        name: default if value is None else value
        for name, (value, default) in shares.items()}).to_dict()


def resumed_config(run_dir: str, stored, argv, override: bool):
    """The configuration to resume ``run_dir`` with: ``stored`` with the settings the
    flags of ``argv`` give, the change recorded in its history. ValueError listing the
    changed settings when they change what is trained and ``override`` is not set."""
    from aldk_tf.training import runs
    given = given_flags(argv)
    unknown = given - FLAG_SETTINGS.keys() - NOT_SETTINGS
    assert not unknown, f"flags missing from FLAG_SETTINGS: {sorted(unknown)}"
    wanted = {key for flag in given & FLAG_SETTINGS.keys() for key in FLAG_SETTINGS[flag]}
    if not wanted:
        return stored
    base = ["-b", BASE_FLAGS.get(stored.model.base, stored.model.base), "-d",
            stored.dataset]
    requested = runs.settings(build_config(parse_args(base + list(argv))))
    merged = {**runs.settings(stored), **{key: requested[key] for key in wanted
                                          if key in requested}}
    config = _from_settings(merged)
    changes = runs.setting_changes(stored, config)
    if not changes:
        return stored
    retrained = sorted(set(changes) - BUDGET_SETTINGS)
    if retrained and not override:
        raise ValueError(f"-c {run_dir}: these flags change what the run trains: "
                         f"{runs.describe_changes({k: changes[k] for k in retrained})}; "
                         f"resume without them, or add --override to apply and record "
                         f"the change")
    config.history = [*stored.history, {"at_step": _latest_step(run_dir),
                                        "changes": changes, "override": bool(retrained)}]
    return config


def _from_settings(flat: dict):
    from aldk_tf.config import RunConfig
    nested: dict = {}
    for key, value in sorted(flat.items()):      # a section before its own settings
        *parents, name = key.split(".")
        node = nested
        for parent in parents:
            if node.get(parent) is None:          # e.g. train.generator: None, then set
                node[parent] = {}
            node = node[parent]
        if value is None and isinstance(node.get(name), dict):
            continue
        node[name] = value
    return RunConfig.from_dict(nested)


def _latest_step(run_dir: str) -> int:
    import tensorflow as tf
    latest = tf.train.latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    return int(latest.rsplit("-", 1)[1]) if latest else 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from aldk_tf.training import distribute, runs
    from aldk_tf.data import DataError
    try:
        check_values(args)                  # before anything is created
        check_paths(args)
        if args.override and not args.checkpoint:
            raise ValueError("--override applies to a resumed run (-c RUN)")
        if args.output and args.checkpoint:
            raise ValueError(f"--output names a new run; -c {args.checkpoint} resumes "
                             "that run in its own directory (give one of them)")
        if args.checkpoint:
            run_dir, new = args.checkpoint, False
            stored = runs.load_run_config(run_dir)
        else:
            config = build_config(args)
            name = args.output or datetime.datetime.now().strftime(
                f"%b%d-%H%M_{args.base_network}{args.n_cascades}")
            run_dir, new = os.path.join(args.weights_dir, name), True
        # Devices and the strategy next: TensorFlow must not have started yet.
        strategy = distribute.make_strategy(args.gpu, args.strategy, args.cpu_replicas)
        if distribute.is_multi_worker(strategy) and not (args.checkpoint or args.output):
            raise ValueError("--strategy multiworker needs --output (or -c): every "
                             "worker must name the same run")
        from aldk_tf.training.run import train
        # Only the chief writes the run directory (and holds its lock).
        claim = (runs.claim_run(run_dir, new) if distribute.is_chief(strategy)
                 else contextlib.nullcontext())
        with claim:
            if not new:
                config = resumed_config(run_dir, stored, argv, args.override)
                for entry in config.history[len(stored.history):]:
                    print(f"{run_dir}: changing from step {entry['at_step']}: "
                          f"{runs.describe_changes(entry['changes'])} (recorded in "
                          f"config.json once the checkpoint is restored)",
                          file=sys.stderr)
            verbose = args.verbose if args.verbose is not None else (
                "auto" if sys.stderr.isatty() else 2)
            print(f"run directory: {run_dir}", file=sys.stderr)
            if strategy.num_replicas_in_sync > 1:
                print(f"{type(strategy).__name__}: {strategy.num_replicas_in_sync} "
                      f"replicas, global batch {config.train.batch}", file=sys.stderr)
            train(config, run_dir, verbose=verbose, max_steps=args.max_steps,
                  strategy=strategy, log_every=args.log_every)
    except (DataError, runs.RunError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"weights: {runs.weights_path(run_dir)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
