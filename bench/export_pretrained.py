"""Export the study's best student as the shipped pretrained model.

    python bench/export_pretrained.py --study study_64 --out aldk_tf/pretrained/brain_mr_64
    python bench/export_pretrained.py --run long_64/weights/student --heldout \
        bench/results/heldout-64.json --out aldk_tf/pretrained/brain_mr_64

Picks the student row of a finished ``bench/study.py`` run with the highest *validation*
Dice (the test pairs only report), or takes a ``bench/long_train.py`` run at its best
validation weights, exports it as a portable float32 SavedModel (no TFLite, no XLA: it
serves anywhere) and records in ``export_info.json`` what it was trained on, how, and its
numbers. No machine paths: the run's dataset and teacher are recorded by name only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from aldk_tf.training import runs  # noqa: E402

STUDENTS = ("student", "student_flow_distill", "student_flow_distill_refined",
            "student_warp_distill", "student_warp_distill_refined", "student_aldk",
            "student_aldk_refined", "student_crd", "student_crd_aldk", "student_crd_warp")


def best_by_validation(study: str) -> tuple[str, dict]:
    """``(row, {row: validation Dice})`` of the students the study evaluated."""
    scores = {}
    for name in STUDENTS:
        path = os.path.join(study, "evaluate", f"{name}-2.json")
        if os.path.exists(path):
            with open(path) as handle:
                scores[name] = json.load(handle)["dice"]
    if not scores:
        raise runs.RunError(f"{study}: no validation results (evaluate/<row>-2.json); "
                            "let bench/study.py finish first")
    return max(scores, key=scores.get), scores


def portable_config(config: dict) -> dict:
    """A run configuration without machine paths (file names only)."""
    config = json.loads(json.dumps(config))
    config["dataset"] = os.path.basename(config.get("dataset") or "") or None
    teacher = config.get("teacher") or {}
    if teacher.get("run"):
        teacher["run"] = os.path.basename(teacher["run"].rstrip("/"))
    return config


def long_run_info(run_dir: str, heldout: str | None) -> tuple[str, dict, object]:
    """``(name, info, model)`` of a long run at its best validation weights."""
    from aldk_tf.training.run import read_validation
    config, model = runs.load_model(run_dir, best=True)
    record = read_validation(run_dir)
    if not record.get("best"):
        raise runs.RunError(f"{run_dir}: no validation record; nothing to choose from")
    name = os.path.basename(run_dir.rstrip("/"))
    rows = {}
    if heldout:
        with open(heldout) as handle:
            rows = json.load(handle)["rows"]
    info = {
        "model": name,
        "trained_on": "pairs generated on the fly (aldk_tf.data.synth) from nilearn's "
                      "ICBM 2009a template at 64^3; validated on subjects of the MNI152 "
                      "linear average avg152T1_brain (held-out anatomy)",
        "image_size": list(config.model.image_size),
        "training": {"run_config": portable_config(config.to_dict()),
                     "validation": record},
        "heldout_test": {key: rows[key] for key in rows
                         if key in ("before", "syn") or key.startswith(name)},
        "command": f"python bench/long_train.py --name {name} (see "
                   f"bench/results/long-{name}.json for the full command)",
        "warmup_note": "not shipped (6 MB); export.py writes "
                       "assets.extra/tf_serving_warmup_requests",
    }
    return name, info, (config, model)


def study_info(study: str) -> tuple[str, dict, tuple]:
    """``(name, info, (config, model))`` of a ``bench/study.py`` run's best student."""
    from aldk_tf.data import load_dataset_config
    best, validation = best_by_validation(study)
    with open(os.path.join(study, "study.json")) as handle:
        document = json.load(handle)
    config, model = runs.load_model(os.path.join(study, "weights", best))
    dataset = load_dataset_config(config.dataset)
    settings = document["settings"]
    info = {
        "model": best,
        "trained_on": dataset.extra.get("description", ""),
        "image_size": list(config.model.image_size),
        "training": {"run_config": portable_config(config.to_dict()),
                     "study_settings": settings},
        "validation_dice": validation,
        "study_test": document["rows"].get(best),
        "study_before": document["rows"].get("before"),
        "command": "python bench/study.py " + " ".join(
            f"--{key.replace('_', '-')} {value}" for key, value in settings.items()
            if value is not None and key not in ("json", "markdown", "rows")),
        "warmup_note": "not shipped (6 MB); export.py writes "
                       "assets.extra/tf_serving_warmup_requests",
    }
    return best, info, (config, model)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--study", help="bench/study.py --out folder")
    source.add_argument("--run", help="a bench/long_train.py run folder (weights/<name>)")
    parser.add_argument("--heldout", help="with --run: bench/heldout_eval.py's JSON")
    parser.add_argument("--out", default="aldk_tf/pretrained/brain_mr_64")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing export in --out")
    args = parser.parse_args(argv)
    from aldk_tf.data.demo_set import TISSUES, preprocessing
    from aldk_tf.deploy.export import export_model
    try:
        name, info, (config, model) = (long_run_info(args.run, args.heldout) if args.run
                                       else study_info(args.study))
        # Demo subjects and generated pairs are prepared alike (the template's box):
        # what register must reproduce on a new scan.
        block = preprocessing(int(config.model.image_size[0]))
        info["preprocessing"] = (config.preprocessing or block.to_dict())
        info["preparation"] = ("skull-stripped T1: " + block.describe()
                               + "; recorded in 'preprocessing', which register "
                                 "reproduces")
        if os.path.isdir(args.out) and os.listdir(args.out):
            if not args.overwrite:
                raise runs.RunError(f"{args.out}: exists; pass --overwrite to replace it")
            shutil.rmtree(args.out)
        exported = export_model(model, args.out, version=1, tflite=(),
                                label_values=sorted(TISSUES.values()), info=info,
                                portable=True, warmup=False)
    except (runs.RunError, OSError, KeyError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"exported {name} to {exported.get('path', args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
