"""Export a trained run for deployment: SavedModel (TF Serving layout) and TFLite.

    python export.py -c weights/<run> --out export/<name> [--version N]
                     [--tflite fp32,fp16,int8 | none] [-r rep] [-d dataset.json]

writes ``export/<name>/<N>/`` (SavedModel with signatures ``serving_default``: fixed,
moving -> flow, warped; and ``warp_segmentation``: segmentation, flow ->
warped_segmentation), ``export/<name>/<N>/tflite/model_<variant>.tflite`` (batch 1,
builtin ops only) and ``export_info.json`` (with the dataset and its data-preparation
settings, which ``aldk-register`` applies to new scans), then prints a parity check of
every exported form against the Keras model. Only the registration model of the run is exported.

Installed, the same tool is the console script ``aldk-export``. Parsing the flags imports
no TensorFlow (``--help`` answers at once); its start-up log lines are hidden unless
``--verbose``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from aldk_tf.training import runs
from aldk_tf.config import MAX_REP
from aldk_tf.data import VALIDATION_SCHEME, DataError, load_dataset_config
from aldk_tf.evaluation import EvaluationError, check_image_size
from aldk_tf.deploy.cpu import bf16_features
from aldk_tf.deploy.export_layout import (DTYPES, TFLITE_VARIANTS, ExportError,
                                          prepare_base, remove_if_new_and_empty)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--checkpoint", required=True, help="run directory "
                        "weights/<run>")
    parser.add_argument("--out", required=True, help="model base directory, e.g. "
                        "export/aldk (versions go in numbered subdirectories)")
    parser.add_argument("--version", type=int, help="version number (default: one more "
                        "than the largest present, or 1)")
    parser.add_argument("--tflite", action="append", help="TFLite variants, comma "
                        f"separated or repeated: {', '.join(TFLITE_VARIANTS)} or none "
                        "(default: all)")
    parser.add_argument("-r", "--rep", type=int, help="shared-weight repetitions baked "
                        "into the graph (default: the run's)")
    parser.add_argument("-d", "--dataset", help="dataset JSON whose first validation "
                        "pair is the parity input (default: the run's, if present)")
    parser.add_argument("--portable", action="store_true", help="strip the XLA marks of "
                        "the warp: for TF Serving without --xla_cpu_compilation_enabled "
                        "(slower warps)")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max flow "
                        "difference allowed for the SavedModel and fp32 TFLite "
                        "(default 1e-4 voxels)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="the "
                        "SavedModel's convolutions: float32 (default) or bfloat16 (faster "
                        "on CPUs with AMX or AVX512-BF16; inputs and outputs stay float32, "
                        "flow checked to 0.25 voxel); TFLite stays float32")
    parser.add_argument("--verbose", action="store_true", help="show TensorFlow's log "
                        "lines")
    return parser.parse_args(argv)


def tflite_variants(values) -> list[str]:
    if not values:
        return list(TFLITE_VARIANTS)
    names = [name.strip() for value in values for name in value.split(",") if name.strip()]
    if names == ["none"]:
        return []
    unknown = sorted(set(names) - set(TFLITE_VARIANTS))
    if unknown:
        raise ExportError(f"--tflite: unknown variant(s) {', '.join(unknown)} (known: "
                          f"{', '.join(TFLITE_VARIANTS)}, or none)")
    return list(dict.fromkeys(names))


def parity_sample(args, run_config) -> tuple[dict | None, list | None, str]:
    """(sample, label values, description) for the parity check.

    The first pair of the validation scheme (or of the first scheme that has pairs) of
    ``-d`` or of the run's dataset. An explicit ``-d`` must work; when the run's own
    dataset cannot be read, a synthetic pair is used instead.
    """
    from aldk_tf.data import list_pairs, load_pair
    path = args.dataset or run_config.dataset
    if not path:
        return None, None, "a synthetic pair (the run names no dataset)"
    try:
        dataset = load_dataset_config(path)
        check_image_size(run_config.model.image_size, dataset)
        schemes = [VALIDATION_SCHEME, *[name for name in dataset.schemes
                                        if name != VALIDATION_SCHEME]]
        pairs = []
        for scheme in schemes:
            try:
                pairs = list_pairs(dataset, scheme)
                break
            except DataError:
                continue
        if not pairs:
            raise DataError(f"{path}: no scheme gives a pair of scans")
        fixed_id, moving_id = pairs[0]
        pair = load_pair(dataset, fixed_id, moving_id)
    except (DataError, EvaluationError) as error:
        if args.dataset:
            raise
        return None, None, f"a synthetic pair (the run's dataset is not usable: {error})"
    sample = {key: value[None] for key, value in pair.items() if not key.endswith("_id")}
    return sample, dataset.label_values, f"{fixed_id} <- {moving_id} of {path}"


def run_preprocessing(run_config) -> dict | None:
    """The run's data-preparation settings: its own record, else its dataset JSON's
    (runs made before the run config carried them), else None."""
    from aldk_tf.data.preprocess import PreprocessSettings
    if run_config.preprocessing is not None:
        return PreprocessSettings.from_dict(run_config.preprocessing,
                                            where="config.json: 'preprocessing'").to_dict()
    try:
        settings = load_dataset_config(run_config.dataset).preprocessing
    except DataError:
        return None
    return None if settings is None else settings.to_dict()


def main(argv=None) -> int:
    args = parse_args(argv)
    from aldk_tf.console import import_tensorflow
    import_tensorflow(args.verbose)
    existed = os.path.isdir(args.out)
    try:
        variants = tflite_variants(args.tflite)
        if args.rep is not None and not 1 <= args.rep <= MAX_REP:
            raise ExportError(f"-r: expected an integer in 1..{MAX_REP}, got {args.rep}")
        if args.version is not None and args.version < 1:
            raise ExportError(f"--version: expected an integer >= 1, got {args.version}")
        if not 0 <= args.tolerance < math.inf:
            raise ExportError(f"--tolerance: expected a finite number of voxels >= 0, "
                              f"got {args.tolerance}")
        run_config = runs.load_run_config(args.checkpoint)
        sample, label_values, described = parity_sample(args, run_config)
        _, model = runs.load_model(args.checkpoint, rep=args.rep)   # before any output
        prepare_base(args.out)
        preprocessing = run_preprocessing(run_config)
        from aldk_tf.deploy.export import export_model
        from aldk_tf.deploy.serving import format_parity
        info = export_model(
            model, args.out, version=args.version, tflite=variants, sample=sample,
            label_values=label_values, tolerance=args.tolerance, portable=args.portable,
            dtype=args.dtype, info={"run": args.checkpoint, "rep": model.rep,
                  "model": run_config.to_dict()["model"], "parity_input": described,
                  "parameters": int(model.count_params()),
                  "dataset": run_config.dataset, "preprocessing": preprocessing})
    except (runs.RunError, DataError, EvaluationError, ExportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        remove_if_new_and_empty(args.out, existed)
    print(f"SavedModel: {info['path']}  ({args.dtype} convolutions; signatures "
          f"serving_default: fixed, moving -> flow, warped; warp_segmentation: "
          f"segmentation, flow -> warped_segmentation)")
    if args.dtype == "bfloat16" and not bf16_features():
        print("Note: this CPU has neither amx_bf16 nor avx512_bf16: the bfloat16 "
              "SavedModel runs here, but slower than float32; serve it on a CPU that has")
    for variant, name in info["tflite"].items():
        path = os.path.join(info["path"], name)
        print(f"TFLite {variant}: {path}  ({os.path.getsize(path) / 2 ** 20:.1f} MiB)")
    if preprocessing is None:
        print("Preprocessing: not recorded by the data preparation; aldk-register will "
              "need --modality/--crop for new scans")
    else:
        from aldk_tf.data.preprocess import PreprocessSettings
        print(f"Preprocessing (used by aldk-register): "
              f"{PreprocessSettings.from_dict(preprocessing).describe()}")
    print(f"Parity against the Keras model on {described}:")
    print(format_parity(info["parity"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
