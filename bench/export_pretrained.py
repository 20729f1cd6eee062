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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", required=True, help="bench/study.py --out folder")
    parser.add_argument("--out", default="aldk_tf/pretrained/brain_mr_64")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing export in --out")
    args = parser.parse_args(argv)
    from aldk_tf.data import load_dataset_config
    from aldk_tf.deploy.export import export_model
    try:
        best, validation = best_by_validation(args.study)
        with open(os.path.join(args.study, "study.json")) as handle:
            study = json.load(handle)
        run_dir = os.path.join(args.study, "weights", best)
        config, model = runs.load_model(run_dir)
        dataset = load_dataset_config(config.dataset)
        settings = study["settings"]
        info = {
            "model": best,
            "trained_on": dataset.extra.get("description", ""),
            "image_size": list(config.model.image_size),
            "preparation": "skull-stripped T1: brain bounding box + 8 mm margin, resampled "
                           "to 64^3, intensities 0..255 (max-normalised template); "
                           "register prepares NIfTI input with its MR defaults",
            "training": {"run_config": config.to_dict(), "study_settings": settings},
            "validation_dice": validation,
            "study_test": study["rows"].get(best),
            "study_before": study["rows"].get("before"),
            "command": "python bench/study.py " + " ".join(
                f"--{key.replace('_', '-')} {value}" for key, value in settings.items()
                if value is not None and key not in ("json", "markdown", "rows")),
            # TF Serving's warm-up requests (a 64³ pair, 6 MB in the repository's
            # history) are left out; export.py writes them for a model one deploys.
            "warmup_note": "not shipped (6 MB); export.py writes "
                           "assets.extra/tf_serving_warmup_requests",
        }
        if os.path.isdir(args.out) and os.listdir(args.out):
            if not args.overwrite:
                raise runs.RunError(f"{args.out}: exists; pass --overwrite to replace it")
            shutil.rmtree(args.out)
        exported = export_model(model, args.out, version=1, tflite=(),
                                label_values=dataset.label_values, info=info,
                                portable=True, warmup=False)
    except (runs.RunError, OSError, KeyError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"exported {best} (validation Dice {validation[best]:.4f}) to "
          f"{exported.get('path', args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
