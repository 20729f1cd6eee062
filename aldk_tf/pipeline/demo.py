"""The whole pipeline, offline, on the embedded demo dataset (``aldk-demo``,
:mod:`aldk_tf.cli.demo`), in the study's regime.

build the demo set's validation and test subjects (nilearn's MNI152 template, every
subject a different brain) -> train the teacher (VTN affine stem + VTN cascade) on
generated pairs (a new pair every step: the template's anatomy under random deformations,
half with synthesised intensities; the label term; the step schedule) -> choose how many
times to apply its cascade on the validation pairs -> train, on the same generated pairs
with the same schedule and budget, the student alone, with image-level distillation and
with ALDK from that teacher (run on every batch, its flows refined per pair), and the
cross-resolution student (with ``--crd-control``, also the same CRD terms at full
resolution) -> evaluate all on the test
subjects -> export the student with the best validation Dice (SavedModel + TFLite) ->
print a table and write ``DIR/results.json``. The student rows differ only in what their
names say.

Everything lands in ``--out`` (default ``demo_run/``); a second call reuses what is
finished (runs resume from their checkpoints), so an interrupted demo continues.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from aldk_tf.training import runs  # noqa: E402
from aldk_tf.config import (ALDKConfig, CRDConfig, LossWeights, ModelConfig,  # noqa: E402
                            RunConfig, TeacherConfig, TrainConfig, atomic_write_text)

METHODS = ("before", "teacher", "student", "student_warp_distill", "student_aldk",
           "student_distilled", "student_crd")
STUDENTS = METHODS[2:]
#: Weight of the soft-Dice term on the generated label maps (the study's).
LABEL_WEIGHT = 1.0
#: The step schedule's epochs (flat for three, then halved every epoch).
DECAY_EPOCHS = 6
LABELS = {"before": "before registration", "teacher": "teacher (affine + VTN, Rx)",
          "student": "student", "student_warp_distill": "student + image-level distillation",
          "student_aldk": "student + ALDK",
          "student_distilled": "student + CRD terms, full res.",
          "student_crd": "student, cross-resolution (1/2)"}


def train_settings(args, steps: int, flag: str) -> TrainConfig:
    """The schedule every demo run trains with: generated pairs, ``steps`` in six epochs
    (Adam at ``--lr`` for three, then halved every epoch), gradient norm clipped at 1."""
    from aldk_tf.deploy.cpu import training_precision
    from aldk_tf.data.synth import GeneratorSettings
    epochs = DECAY_EPOCHS if steps >= DECAY_EPOCHS else 1
    if steps < 1 or steps % epochs:
        raise ValueError(f"{flag} {steps}: expected a multiple of {DECAY_EPOCHS} (the "
                         f"schedule's epochs), or 1 to {DECAY_EPOCHS - 1} (a constant rate)")
    return TrainConfig(batch=args.batch, round=steps // epochs, epochs=epochs,
                       lr=args.lr, seed=args.seed,
                       schedule="step" if epochs > 1 else "constant",
                       checkpoint_every=max(steps // 4, 1), validate_every=0, clip_norm=1.0,
                       generator=GeneratorSettings(source="mixed").to_dict(),
                       precision=training_precision(args.precision))


def teacher_config(args, dataset: str) -> RunConfig:
    return RunConfig(dataset=dataset, model=ModelConfig(
        role="teacher", base="vtn", affine="vtn", n_cascades=args.teacher_cascades,
        image_size=(args.size,) * 3), losses=LossWeights(label=LABEL_WEIGHT),
        train=train_settings(args, args.teacher_steps, "--teacher-steps"))


def run_configs(args, dataset: str, teacher_dir: str,
                teacher_rep: int = 0) -> dict[str, RunConfig]:
    """The teacher's and the student rows' configurations; the distilled rows run the
    teacher of ``teacher_dir`` with its cascade applied ``teacher_rep`` times (0: as
    trained) on every batch, its flows refined by ``--refine-steps`` (the image-level
    and ALDK rows; the CRD terms take the raw flows)."""
    size = (args.size,) * 3
    student_model = ModelConfig(image_size=size)
    common = dict(dataset=dataset, losses=LossWeights(label=LABEL_WEIGHT),
                  train=train_settings(args, args.student_steps, "--student-steps"))
    distilled = dict(common, teacher=TeacherConfig(run=teacher_dir, rep=teacher_rep))
    configs = {
        "teacher": teacher_config(args, dataset),
        "student": RunConfig(model=student_model, **common),
        "student_warp_distill": RunConfig(
            model=student_model, aldk=ALDKConfig(flow_weight=args.warp_weight,
                                                 flow_target=args.distill_target,
                                                 refine=args.refine_steps),
            **distilled),
        "student_aldk": RunConfig(model=student_model,
                                  aldk=ALDKConfig(enabled=True, refine=args.refine_steps),
                                  **distilled),
    }
    if not args.no_crd:
        # The control (with --crd-control) first: the same distillation terms, teacher
        # and budget at full resolution, so the two rows differ only in the resolution.
        crd_rows = ((("student_distilled", 1),) if args.crd_control else ()) + \
            (("student_crd", 2),)
        for name, factor in crd_rows:
            configs[name] = RunConfig(
                model=ModelConfig(image_size=size, resolution_factor=factor),
                crd=CRDConfig(enabled=True), **distilled)
    return configs


class Identity:
    """The 'before registration' row: a zero flow."""

    def __call__(self, fixed, moving):
        return {"flow": np.zeros(fixed.shape[:4] + (3,), np.float32)}


def evaluate_runs(out: str, dataset_config, models: dict) -> dict:
    from aldk_tf.data import list_pairs
    from aldk_tf.evaluation import evaluate_pairs
    from aldk_tf.reports import write_json_report, write_rcn_report
    pairs = list_pairs(dataset_config, "test")
    results = {}
    os.makedirs(os.path.join(out, "evaluate"), exist_ok=True)
    for method, (model, params) in models.items():
        print(f"evaluating {method} on {len(pairs)} test pairs", file=sys.stderr)
        records, summary = evaluate_pairs(model, dataset_config, pairs, batch=1,
                                          label_values=dataset_config.label_values,
                                          progress=False)
        stem = os.path.join(out, "evaluate", f"{method}-test")
        write_rcn_report(stem + ".txt", records)
        write_json_report(stem + ".json", records, summary, method=method)
        results[method] = {"dice": summary["dice"]["mean"],
                           "dice_std": summary["dice"]["std"],
                           "jacc": summary["jacc"]["mean"],
                           "ms_per_pair": 1000.0 * summary["seconds"]["mean"],
                           "folding_percent": summary["folding_percent"]["mean"],
                           "params": params}
    return results


def best_student(out: str, dataset_config, models: dict) -> str:
    """The student row with the highest mean Dice on the validation pairs (scheme "2")."""
    from aldk_tf.data import list_pairs
    from aldk_tf.evaluation import evaluate_pairs
    pairs = list_pairs(dataset_config, "2")
    scores = {}
    for name in STUDENTS:
        if name in models:
            _, summary = evaluate_pairs(models[name][0], dataset_config, pairs,
                                        label_values=dataset_config.label_values,
                                        progress=False)
            scores[name] = summary["dice"]["mean"]
    atomic_write_text(os.path.join(out, "evaluate", "validation.json"),
                      json.dumps(scores, indent=2) + "\n")
    return max(scores, key=scores.get)


def format_table(results: dict, size: int) -> str:
    lines = [f"Demo results on the test subjects ({size}^3, wall-clock time per pair on "
             f"this machine's CPU, batch 1):",
             f"{'method':34s} {'Dice':>14s} {'Jacc':>7s} {'fold %':>7s} {'ms/pair':>8s} "
             f"{'params':>11s}"]
    for method in METHODS:
        if method not in results:
            continue
        r = results[method]
        label = LABELS[method].replace("Rx", f"{r.get('rep', 1)}x")
        lines.append(f"{label:34s} {r['dice']:7.4f} ({r['dice_std']:.3f}) "
                     f"{r['jacc']:7.4f} {r['folding_percent']:7.3f} "
                     f"{r['ms_per_pair']:8.1f} {r['params']:11,d}")
    return "\n".join(lines)


def try_it(out: str, dataset: str, export_base: str) -> str:
    """Write two test subjects as NIfTI (``<out>/scans``) and return the ``register``
    command that aligns them with the exported student."""
    from aldk_tf.data.demo_set import write_nifti_subjects
    scans = write_nifti_subjects(dataset, os.path.join(out, "scans"))
    fixed, _, moving, moving_seg = (str(path) for path in scans)
    return ("try the exported student on two test subjects:\n"
            f"  python -m aldk_tf.cli.register --model {export_base} --fixed {fixed} "
            f"--moving {moving} --moving-seg {moving_seg} "
            f"--out {os.path.join(out, 'registered')}")


def choose_teacher_rep(out: str, dataset_config, teacher_dir: str,
                       most: int) -> tuple[int, dict]:
    """The number of times (1..``most``) to apply the teacher's cascade: the one with the
    highest mean Dice on the validation pairs (scheme "2"); ``(rep, {rep: Dice})``, also
    written to ``<out>/evaluate/teacher-rep.json``."""
    from aldk_tf.data import list_pairs
    from aldk_tf.evaluation import evaluate_pairs
    pairs = list_pairs(dataset_config, "2")
    path = os.path.join(out, "evaluate", "teacher-rep.json")
    if os.path.isfile(path):
        with open(path) as handle:
            scores = {int(rep): dice for rep, dice in json.load(handle).items()}
        if set(scores) == set(range(1, most + 1)):
            return max(scores, key=scores.get), scores
    scores = {}
    for rep in range(1, most + 1):
        _, model = runs.load_model(teacher_dir, rep=rep)
        _, summary = evaluate_pairs(model, dataset_config, pairs,
                                    label_values=dataset_config.label_values,
                                    progress=False)
        scores[rep] = summary["dice"]["mean"]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_text(path, json.dumps(scores, indent=2) + "\n")
    return max(scores, key=scores.get), scores


def run_demo(args) -> tuple[dict, str | None]:
    """The whole pipeline with the settings of ``aldk-demo``'s flags ``args`` (see
    :mod:`aldk_tf.cli.demo`): ``(results per row, the register command to try the exported
    student with, or None with --no-export)``; the results are also written to
    ``<out>/results.json``."""
    from aldk_tf.data import DataError, load_dataset_config
    from aldk_tf.data.demo_set import build_demo
    from aldk_tf.training.run import train
    for steps, flag in ((args.teacher_steps, "--teacher-steps"),
                        (args.student_steps, "--student-steps")):
        train_settings(args, steps, flag)          # a bad budget fails before any work
    out = os.path.abspath(args.out)
    data_dir = os.path.join(out, "data")
    dataset = os.path.join(data_dir, "demo.json")
    os.makedirs(out, exist_ok=True)
    if not os.path.exists(dataset):
        print(f"building the demo dataset in {data_dir}", file=sys.stderr)
        # Training pairs are generated: two placeholder training subjects only.
        build_demo(data_dir, size=args.size, seed=args.seed, log=None,
                   subjects=2 + args.validation + args.test, validation=args.validation,
                   test=args.test, vary=not args.same_anatomy)
    dataset_config = load_dataset_config(dataset)
    if tuple(dataset_config.image_size) != (args.size,) * 3:
        raise DataError(f"{dataset}: built at {dataset_config.image_size}, not "
                        f"{args.size}^3; use another --out")
    weights = os.path.join(out, "weights")
    teacher_dir = os.path.join(weights, "teacher")
    models = {"before": (Identity(), 0)}

    def trained(name, config):
        run_dir = os.path.join(weights, name)
        print(f"training {name} ({config.train.round * config.train.epochs} steps) in "
              f"{run_dir}", file=sys.stderr)
        train(config, run_dir, verbose=2)
        return run_dir

    trained("teacher", teacher_config(args, dataset))
    rep, scores = choose_teacher_rep(out, dataset_config, teacher_dir, args.teacher_reps)
    print("teacher's cascade applied " + ", ".join(
        f"{r}x: validation Dice {d:.4f}" for r, d in scores.items()) + f" -> {rep}x",
        file=sys.stderr)
    _, teacher = runs.load_model(teacher_dir, rep=rep)
    models["teacher"] = (teacher, int(teacher.count_params()))
    configs = run_configs(args, dataset, teacher_dir, teacher_rep=rep)
    del configs["teacher"]
    for name, config in configs.items():
        _, model = runs.load_model(trained(name, config))
        models[name] = (model, int(model.count_params()))
    results = evaluate_runs(out, dataset_config, models)
    results["teacher"]["rep"] = rep
    command = None
    if not args.no_export:
        from aldk_tf.deploy.export import export_model
        best = best_student(out, dataset_config, models)
        base = os.path.join(out, "export", best)
        if not os.path.isdir(base) or not os.listdir(base):
            print(f"exporting {best} (best validation Dice) to {base}", file=sys.stderr)
            export_model(models[best][0], base, version=1,
                         label_values=dataset_config.label_values)
        command = try_it(out, dataset, base)
    atomic_write_text(os.path.join(out, "results.json"),
                      json.dumps(results, indent=2) + "\n")
    return results, command
