"""Long training on generated pairs, validated on held-out anatomy: ``bench/long_train.py``.

A first-class long job: a student (or teacher) trained on pairs drawn on the fly
(:mod:`aldk_tf.data.synth`: every step a new pair from nilearn's ICBM 2009a template), for as
many steps as it is given, checkpointed every ``--checkpoint-every`` steps and resumable
after ``kill -9`` (run the same command again), validated every ``--validate-every`` steps
on pairs of subjects built from another template (``--heldout-t1``, e.g. the MNI152 linear
average ``avg152T1_brain.nii.gz``: brains the generator never drew), keeping the weights of
the best validation Dice (``best.weights.h5`` in the run folder).

Writes, after training (and with ``--curve-only`` at any time, also while it runs):
``<results>/long-<name>.json`` (the validation record, the run's settings, the command) and
``long-<name>.png`` / ``.md``: validation Dice against steps (does more training still pay?).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(HERE) not in sys.path:
    sys.path.insert(0, os.path.dirname(HERE))

from aldk_tf.config import (ALDKConfig, ModelConfig, LossWeights, RunConfig,  # noqa: E402
                            TeacherConfig, TrainConfig, atomic_write_text)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="long_64", help="work folder (resumable)")
    parser.add_argument("--name", default="student", help="run name under <out>/weights")
    parser.add_argument("--role", choices=("student", "teacher"), default="student")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heldout-t1", required=True,
                        help="skull-stripped T1 (MNI space) the validation and test "
                             "subjects are built from (unseen anatomy)")
    parser.add_argument("--val", "--validation", dest="validation", type=int, default=4)
    parser.add_argument("--test", type=int, default=6)
    parser.add_argument("--steps", type=int, default=12000, help="planned steps")
    parser.add_argument("--decay-epochs", type=int, default=6,
                        help="the steps split into this many epochs, step schedule (flat 3 "
                             "epochs, then halved per epoch); 1: constant LR")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--clip-norm", type=float, default=1.0)
    parser.add_argument("--checkpoint-every", type=int, default=250)
    parser.add_argument("--validate-every", type=int, default=500)
    parser.add_argument("--validation-pairs", type=int, default=12)
    parser.add_argument("--source", choices=("synth", "real", "mixed"), default="mixed")
    parser.add_argument("--synth-fraction", type=float, default=0.5)
    parser.add_argument("--shapes", type=float, default=0.0)
    parser.add_argument("--label-weight", type=float, default=0.0,
                        help="weight of the soft-Dice term on the generated label maps")
    distill = parser.add_argument_group("distillation from a teacher run (run online on "
                                        "every generated batch)")
    distill.add_argument("--teacher", help="teacher run name under <out>/weights")
    distill.add_argument("--teacher-rep", type=int, default=0,
                         help="the teacher's shared-weight repetitions (0: as trained)")
    distill.add_argument("--flow-distill", type=float, default=0.0,
                         help="weight of the plain distillation term")
    distill.add_argument("--distill-target", choices=("flow", "warped", "warped_gated"),
                         default="flow",
                         help="what --flow-distill compares: the flows, or the moving "
                              "image warped by each (image-level; warped_gated: only on "
                              "pairs the teacher aligns better than the student)")
    distill.add_argument("--refine-targets", type=int, default=0, metavar="N",
                         help="refine the teacher's flow of every batch by N steps of "
                              "instance optimisation before it is a target")
    distill.add_argument("--aldk", action="store_true",
                         help="adversarial distillation (WGAN-GP critic)")
    distill.add_argument("--critic-input", choices=("flow", "images"), default="flow",
                         help="what the critic judges")
    parser.add_argument("--precision", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--max-steps", type=int, help="stop at this step this time")
    parser.add_argument("--results", default=os.path.join(HERE, "results"))
    parser.add_argument("--curve-only", action="store_true",
                        help="write the curve from the run's record; no training")
    return parser.parse_args(argv)


def dataset_path(args) -> str:
    """The validation/test dataset (built once): 2 placeholder training subjects (the
    generator replaces them), validation and test subjects from ``--heldout-t1``."""
    from aldk_tf.data.demo_set import build_demo
    path = os.path.join(os.path.abspath(args.out), "data", "demo.json")
    if not os.path.exists(path):
        print(f"[long] building the held-out pairs in {os.path.dirname(path)}",
              file=sys.stderr)
        build_demo(os.path.dirname(path), size=args.size, seed=args.seed,
                   subjects=2 + args.validation + args.test, validation=args.validation,
                   test=args.test, log=None, vary=True, test_template=args.heldout_t1,
                   heldout_validation=True)
    return path


def run_config(args, dataset: str) -> RunConfig:
    from aldk_tf.data.synth import GeneratorSettings
    epochs = max(args.decay_epochs, 1)
    if args.steps % epochs:
        raise SystemExit(f"error: --steps {args.steps} do not split into --decay-epochs "
                         f"{epochs}")
    generator = GeneratorSettings(source=args.source, synth_fraction=args.synth_fraction,
                                  shapes=args.shapes).to_dict()
    size = (args.size,) * 3
    model = (ModelConfig(image_size=size) if args.role == "student" else
             ModelConfig(role="teacher", base="vtn", affine="vtn", image_size=size))
    distilled = args.aldk or args.flow_distill > 0
    if distilled != bool(args.teacher):
        raise SystemExit("error: --teacher goes with --flow-distill W or --aldk (and they "
                         "need a --teacher)")
    if args.role == "teacher" and args.teacher:
        raise SystemExit("error: --role teacher does not learn from a --teacher")
    teacher = TeacherConfig()
    if args.teacher:
        teacher_dir = os.path.join(os.path.abspath(args.out), "weights", args.teacher)
        if not os.path.isfile(os.path.join(teacher_dir, "config.json")):
            raise SystemExit(f"error: --teacher {args.teacher}: no run in {teacher_dir}")
        teacher = TeacherConfig(run=teacher_dir, rep=args.teacher_rep)
    from aldk_tf.data.demo_set import preprocessing
    return RunConfig(dataset=dataset, model=model, teacher=teacher,
                     aldk=ALDKConfig(enabled=args.aldk, flow_weight=args.flow_distill,
                                     flow_target=args.distill_target,
                                     critic_input=args.critic_input,
                                     refine=args.refine_targets),
                     preprocessing=preprocessing(args.size).to_dict(),
                     losses=LossWeights(label=args.label_weight),
                     train=TrainConfig(batch=args.batch, round=args.steps // epochs,
                                       epochs=epochs, lr=args.lr, seed=args.seed,
                                       schedule="step" if epochs > 1 else "constant",
                                       checkpoint_every=args.checkpoint_every,
                                       validate_every=args.validate_every,
                                       validation_pairs=args.validation_pairs,
                                       clip_norm=args.clip_norm, generator=generator,
                                       precision=args.precision))


def write_curve(args, run_dir: str, seconds: float | None = None) -> dict:
    """The validation record as JSON, a Markdown table and a PNG."""
    from aldk_tf.training.run import read_validation
    record = read_validation(run_dir)
    history = [(int(step), float(dice)) for step, dice in record["history"]]
    document = {"command": "python bench/long_train.py " + shlex.join(sys.argv[1:]),
                "settings": json.load(open(os.path.join(run_dir, "config.json"))),
                "history": history, "best": record.get("best"),
                "validation_pairs": record.get("pairs")}
    if seconds is not None:
        document["seconds_this_call"] = seconds
    stem = os.path.join(args.results, f"long-{args.name}")
    atomic_write_text(stem + ".json", json.dumps(document, indent=1) + "\n")
    lines = [f"Validation Dice (held-out template, {record.get('pairs')} pairs) against "
             f"training steps, `{document['command']}`", "", "| step | Dice |", "|---:|---:|"]
    lines += [f"| {step} | {dice:.4f} |" for step, dice in history]
    atomic_write_text(stem + ".md", "\n".join(lines) + "\n")
    if history:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        figure, axis = plt.subplots(figsize=(6, 3.5))
        axis.plot(*zip(*history), marker="o")
        axis.set_xlabel("training step")
        axis.set_ylabel("validation Dice (held-out template)")
        axis.set_title(f"{args.name}: generated pairs, batch {args.batch}")
        axis.grid(alpha=0.3)
        figure.tight_layout()
        temporary = stem + ".tmp.png"
        figure.savefig(temporary, dpi=90)
        os.replace(temporary, stem + ".png")
    return document


def main(argv=None) -> int:
    args = parse_args(argv)
    run_dir = os.path.join(os.path.abspath(args.out), "weights", args.name)
    if args.curve_only:
        write_curve(args, run_dir)
        return 0
    from aldk_tf.training.run import train
    config = run_config(args, dataset_path(args))
    started = time.perf_counter()
    print(f"[long] training {args.name} for {args.steps} steps in {run_dir}",
          file=sys.stderr)
    train(config, run_dir, verbose=2, max_steps=args.max_steps)
    document = write_curve(args, run_dir, time.perf_counter() - started)
    print(f"[long] best validation Dice {document['best']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
