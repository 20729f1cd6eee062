"""The distillation study: does a student gain from its teacher? ``python bench/study.py``.

One dataset, one augmentation, one schedule (``--decay-epochs``: flat, then halved per
epoch; the teacher the same over its longer budget), one step budget and one seed for every
student row; the rows differ only in what their names say. Steps:

1. data: synthetic subjects of *varied* anatomy built from nilearn's ICBM 2009a template
   (:mod:`aldk_tf.data.anatomy`); with ``--heldout-t1`` the test subjects come from another
   template (e.g. ``avg152T1_brain.nii.gz``, see docs/results.md): unseen brains; the
   training subjects are many (56) and paired only within groups of ``--group-size``, so
   no student can memorise its training anatomy and the teacher's flows are stored for a
   few pairs per subject;
2. the teacher (affine + VTN), with a teacher's budget (``--teacher-steps``), applied with
   R shared-weight repetitions of its cascade (RCN's test-time recursion), R chosen on the
   validation pairs (``--teacher-rep`` fixes it);
3. its flows on the training pairs, raw and refined by instance optimisation;
4. the students: alone, with plain flow distillation (raw / refined targets), with ALDK
   (raw / refined targets), cross-resolution (CRD) and CRD + ALDK;
5. evaluation on the test pairs (Dice, Jaccard, folding %, ms per pair), test-time
   refinement of the student with the best *validation* Dice, and the time of that
   refinement per pair at 128³.

Everything lands in ``--out``; a second call resumes (runs from their checkpoints, finished
evaluations are read back). Writes ``--json`` (``{row: {dice, jacc, fold, ms_per_pair,
...}}``) and ``--markdown`` (the README table).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from aldk_tf.training import runs  # noqa: E402
from aldk_tf.config import (ALDKConfig, CRDConfig, ModelConfig, RunConfig,  # noqa: E402
                            TeacherConfig, TrainConfig, atomic_write_text)

ROWS = ("before", "teacher_single", "teacher", "refined_targets", "student",
        "student_flow_distill", "student_flow_distill_refined", "student_warp_distill",
        "student_warp_distill_refined", "student_aldk",
        "student_aldk_refined", "student_crd", "student_crd_aldk", "student_crd_warp",
        "student_refine_test")
DESCRIPTIONS = {
    "before": "before registration (zero flow)",
    "teacher_single": "teacher, its cascade applied once (as trained)",
    "teacher": "teacher: affine + VTN, cascade applied R times (R chosen on validation)",
    "refined_targets": "teacher + instance optimisation (how the refined targets are made)",
    "student": "student alone",
    "student_flow_distill": "student + flow distillation, raw teacher targets (no critic)",
    "student_flow_distill_refined": "student + flow distillation, refined targets",
    "student_warp_distill": "student + image-level distillation (moving warped by the "
                            "teacher's flow), raw targets",
    "student_warp_distill_refined": "student + image-level distillation, refined targets",
    "student_aldk": "student + ALDK (critic), raw teacher targets",
    "student_aldk_refined": "student + ALDK (critic), refined targets",
    "student_crd": "cross-resolution student (1/2), CRD terms",
    "student_crd_aldk": "cross-resolution student + CRD terms + ALDK",
    "student_crd_warp": "cross-resolution student (1/2) + image-level distillation, raw "
                        "targets (no CRD terms)",
    "student_refine_test": "best student (validation) + test-time refinement",
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="study_64", help="work folder (resumable)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--subjects", type=int, default=66,
                        help="training = subjects - validation - test")
    parser.add_argument("--group-size", type=int, default=4,
                        help="training subjects per pairing group (pairs are drawn within "
                             "a group: many subjects, few stored teacher flows; 0: all "
                             "ordered pairs)")
    parser.add_argument("--val", "--validation", dest="validation", type=int, default=4)
    parser.add_argument("--test", type=int, default=6)
    parser.add_argument("--heldout-t1", help="skull-stripped T1 (MNI space) the test "
                        "subjects are built from (unseen anatomy)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--student-steps", type=int, default=600)
    parser.add_argument("--teacher-steps", type=int, default=1800)
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam LR (peak)")
    parser.add_argument("--decay-epochs", type=int, default=6,
                        help="every run's steps split into this many epochs with the step "
                             "schedule (flat 3 epochs, then halved per epoch); 1: constant")
    parser.add_argument("--teacher-lr", type=float, default=None,
                        help="teacher Adam peak LR (default: --lr)")
    parser.add_argument("--clip-norm", type=float, default=1.0,
                        help="clip every run's gradient global norm (typical norms are "
                             "0.2-0.6; this only cuts spikes)")
    parser.add_argument("--flow-weight", type=float, default=0.1,
                        help="weight of the plain flow-distillation term")
    parser.add_argument("--warp-weight", type=float, default=1.0,
                        help="weight of the image-level distillation term (the "
                             "similarity's is 1)")
    parser.add_argument("--teacher-rep", type=int, default=0,
                        help="shared-weight repetitions of the teacher's cascade for its "
                             "row and its targets (0: the best of 1-3 on validation)")
    parser.add_argument("--refine-steps", type=int, default=50,
                        help="instance-optimisation steps for targets and test-time rows")
    parser.add_argument("--json", default="bench/results/study-64.json")
    parser.add_argument("--markdown", default="bench/results/study-64.md")
    parser.add_argument("--rows", help="comma-separated subset of rows (default: all)")
    return parser.parse_args(argv)


def schedule(args, steps: int) -> dict:
    """TrainConfig fields for ``steps`` steps: ``--decay-epochs`` epochs, step schedule."""
    epochs = max(args.decay_epochs, 1)
    if steps % epochs:
        raise SystemExit(f"error: {steps} steps do not split into --decay-epochs {epochs}")
    return {"round": steps // epochs, "epochs": epochs,
            "schedule": "step" if epochs > 1 else "constant"}


def student_runs(args, dataset: str, teacher: str, rep: int) -> dict[str, RunConfig]:
    size = (args.size,) * 3
    train = TrainConfig(batch=args.batch, lr=args.lr, seed=args.seed,
                        **schedule(args, args.student_steps), checkpoint_every=100,
                        validate_every=0, clip_norm=args.clip_norm)
    model = ModelConfig(image_size=size)
    crd_model = ModelConfig(image_size=size, resolution_factor=2)

    def aldk(enabled, flow_weight=0.0, refine=0, target="flow"):
        return ALDKConfig(enabled=enabled, flow_weight=flow_weight, refine=refine,
                          flow_target=target)

    refine, weight = args.refine_steps, args.flow_weight
    distilled = dict(dataset=dataset, train=train, teacher=TeacherConfig(run=teacher, rep=rep))
    return {     # the most telling rows first: a partial study is still a comparison
        "student": RunConfig(dataset=dataset, model=model, train=train),
        "student_flow_distill": RunConfig(model=model, aldk=aldk(False, weight),
                                          **distilled),
        "student_flow_distill_refined": RunConfig(model=model,
                                                  aldk=aldk(False, weight, refine),
                                                  **distilled),
        "student_warp_distill": RunConfig(model=model,
                                          aldk=aldk(False, args.warp_weight,
                                                    target="warped"), **distilled),
        "student_warp_distill_refined": RunConfig(model=model,
                                                  aldk=aldk(False, args.warp_weight, refine,
                                                            target="warped"), **distilled),
        "student_aldk": RunConfig(model=model, aldk=aldk(True), **distilled),
        "student_aldk_refined": RunConfig(model=model, aldk=aldk(True, refine=refine),
                                          **distilled),
        "student_crd": RunConfig(model=crd_model, crd=CRDConfig(enabled=True), **distilled),
        "student_crd_warp": RunConfig(model=crd_model,
                                      aldk=aldk(False, args.warp_weight, target="warped"),
                                      **distilled),
        "student_crd_aldk": RunConfig(model=crd_model, aldk=aldk(True),
                                      crd=CRDConfig(enabled=True), **distilled),
    }


def teacher_run(args, dataset: str) -> RunConfig:
    return RunConfig(dataset=dataset, model=ModelConfig(
        role="teacher", base="vtn", affine="vtn", n_cascades=1,
        image_size=(args.size,) * 3),
        train=TrainConfig(batch=args.batch, lr=args.teacher_lr or args.lr, seed=args.seed,
                          **schedule(args, args.teacher_steps),
                          checkpoint_every=100, validate_every=0,
                          clip_norm=args.clip_norm))


class Identity:
    def __call__(self, fixed, moving):
        return {"flow": np.zeros(fixed.shape[:4] + (3,), np.float32)}


def evaluate(out: str, name: str, model, dataset_config, scheme: str = "test",
             refine: int = 0) -> dict:
    """Evaluate (or read back) one row on ``scheme``'s pairs; ``refine`` > 0: the model's
    flows refined by that many instance-optimisation steps (time included)."""
    from aldk_tf.data import list_pairs
    from aldk_tf.evaluation import evaluate_pairs
    path = os.path.join(out, "evaluate", f"{name}-{scheme}.json")
    if os.path.exists(path):
        with open(path) as handle:
            return json.load(handle)
    pairs = list_pairs(dataset_config, scheme)
    print(f"[study] evaluating {name} on {len(pairs)} {scheme} pairs", file=sys.stderr)
    _, summary = evaluate_pairs(model, dataset_config, pairs, batch=1,
                                label_values=dataset_config.label_values, progress=False,
                                refine=refine)
    row = {"dice": summary["dice"]["mean"], "dice_std": summary["dice"]["std"],
           "jacc": summary["jacc"]["mean"], "fold": summary["folding_percent"]["mean"],
           "jacobian_std": summary["jacobian_det_std"]["mean"],
           "ms_per_pair": 1000.0 * summary["seconds"]["mean"], "pairs": len(pairs)}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_write_text(path, json.dumps(row, indent=2) + "\n")
    return row


def choose_teacher_rep(out: str, teacher, dataset_config, most: int = 3) -> int:
    """The number of shared-weight repetitions (1..``most``) with the best validation
    Dice (RCN applies its cascades recursively at test time)."""
    scores = {rep: evaluate(out, f"teacher-rep{rep}", teacher.with_rep(rep),
                            dataset_config, "2")["dice"] for rep in range(1, most + 1)}
    best = max(scores, key=scores.get)
    print(f"[study] teacher repetitions on validation: {scores}; using {best}",
          file=sys.stderr)
    return best


def train_row(name: str, config: RunConfig, run_dir: str):
    from aldk_tf.training.run import train
    started = time.perf_counter()
    print(f"[study] training {name} ({config.train.round * config.train.epochs} steps) "
          f"in {run_dir}",
          file=sys.stderr)
    train(config, run_dir, verbose=2)
    print(f"[study] {name}: {time.perf_counter() - started:.0f} s", file=sys.stderr)
    _, model = runs.load_model(run_dir)
    return model


def refine_time_128(model_config: ModelConfig, steps: int, repeats: int = 3) -> dict:
    """Median seconds per pair at 128³: the student's flow, then ``steps`` refinements."""
    import dataclasses
    from aldk_tf.evaluation import _flow_function
    from aldk_tf.training.refine import refine_flow
    config = dataclasses.replace(model_config, image_size=(128, 128, 128))
    flow_of = _flow_function(config.build())
    rng = np.random.default_rng(0)
    fixed, moving = (rng.random((1, 128, 128, 128, 1), np.float32) for _ in range(2))
    times = {}
    for count in (0, steps):
        flow_of(fixed, moving)
        refine_flow(fixed, moving, flow_of(fixed, moving), count)   # warm-up / tracing
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            refine_flow(fixed, moving, flow_of(fixed, moving), count)
            samples.append(time.perf_counter() - start)
        times[count] = float(np.median(samples))
    return {"ms_per_pair_128": 1000.0 * times[steps],
            "ms_per_pair_128_network_only": 1000.0 * times[0]}


def markdown(results: dict, args) -> str:
    student = results.get("student", {}).get("dice")
    lines = [f"| row | what | Dice | vs student | Jaccard | folding % | ms/pair "
             f"({args.size}³) |", "|---|---|---|---|---|---|---|"]
    for name in ROWS:
        if name not in results:
            continue
        r = results[name]
        delta = (f"{100 * (r['dice'] - student):+.1f}" if student is not None else "")
        ms = f"{r['ms_per_pair']:.0f}"
        if "ms_per_pair_128" in r:
            ms += f" ({r['ms_per_pair_128']:.0f} at 128³)"
        what = DESCRIPTIONS[name] + (f" (R = {r['rep']})" if "rep" in r else "")
        lines.append(f"| `{name}` | {what} | {r['dice']:.3f} | {delta} | "
                     f"{r['jacc']:.3f} | {r['fold']:.3f} | {ms} |")
    return "\n".join(lines) + "\n"


def write(results: dict, args, started: float, out: str) -> None:
    """The JSON, the Markdown table and the work folder's record, after every row."""
    for name in results:
        results[name]["description"] = DESCRIPTIONS[name]
    document = {"settings": dict(vars(args)), "rows": results,
                "seconds": time.perf_counter() - started}
    for path, text in ((args.json, json.dumps(results, indent=2) + "\n"),
                       (args.markdown, markdown(results, args))):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        atomic_write_text(path, text)
    atomic_write_text(os.path.join(out, "study.json"), json.dumps(document, indent=2) + "\n")


def main(argv=None) -> int:
    args = parse_args(argv)
    from aldk_tf.data import DataError, load_dataset_config
    from aldk_tf.data.demo_set import build_demo
    wanted = set(args.rows.split(",")) if args.rows else set(ROWS)
    out = os.path.abspath(args.out)
    dataset = os.path.join(out, "data", "demo.json")
    started = time.perf_counter()
    if not os.path.exists(dataset):
        print(f"[study] building the dataset in {os.path.dirname(dataset)}",
              file=sys.stderr)
        build_demo(os.path.join(out, "data"), size=args.size, seed=args.seed,
                   subjects=args.subjects, validation=args.validation, test=args.test,
                   log=None, vary=True, test_template=args.heldout_t1,
                   group_size=args.group_size)
    try:
        dataset_config = load_dataset_config(dataset)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    weights = os.path.join(out, "weights")
    teacher_dir = os.path.join(weights, "teacher")
    results: dict[str, dict] = {}
    results["before"] = evaluate(out, "before", Identity(), dataset_config)
    single = train_row("teacher", teacher_run(args, dataset), teacher_dir)
    results["teacher_single"] = evaluate(out, "teacher", single, dataset_config)
    rep = args.teacher_rep or choose_teacher_rep(out, single, dataset_config)
    teacher = single.with_rep(rep)
    results["teacher"] = {**evaluate(out, f"teacher-rep{rep}", teacher, dataset_config),
                          "rep": rep}
    write(results, args, started, out)
    if "refined_targets" in wanted:
        results["refined_targets"] = evaluate(
            out, f"refined_targets-rep{rep}-{args.refine_steps}", teacher, dataset_config,
            refine=args.refine_steps)
    students = {}
    for name, config in student_runs(args, dataset, teacher_dir, rep).items():
        if name not in wanted:
            continue
        students[name] = (config, train_row(name, config, os.path.join(weights, name)))
        results[name] = evaluate(out, name, students[name][1], dataset_config)
        results[name]["params"] = int(students[name][1].count_params())
        write(results, args, started, out)
    if "student_refine_test" in wanted and students:
        validation = {name: evaluate(out, name, model, dataset_config, "2")["dice"]
                      for name, (_, model) in students.items()}
        best = max(validation, key=validation.get)
        row = evaluate(out, f"{best}-refine{args.refine_steps}", students[best][1],
                       dataset_config, refine=args.refine_steps)
        row.update(refine_time_128(students[best][0].model, args.refine_steps),
                   base=best, refine_steps=args.refine_steps)
        results["student_refine_test"] = row
    write(results, args, started, out)
    print(markdown(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
