"""Versioned export directories for TF Serving: :func:`export_model`.

Layout written by :func:`export_model` (``base`` is e.g. ``export/aldk``)::

    base/<N>/                      a SavedModel version directory (TF Serving's layout)
      saved_model.pb, variables/
      tflite/model_fp32.tflite     batch 1, TFLite builtin ops only
      tflite/model_fp16.tflite     float16 weights
      tflite/model_int8.tflite     dynamic-range int8 weights
      export_info.json             source run, image size, parity numbers, the dataset
                                   and its data-preparation settings
      assets.extra/tf_serving_warmup_requests
                                   TFRecord of PredictionLog records (one per signature)
                                   that TF Serving replays when it loads the version, so
                                   the first client request does not pay tracing / XLA
                                   compilation (needs tensorflow-serving-api; skipped
                                   with a note in export_info.json otherwise)

The SavedModel's signatures and the TFLite variants: :mod:`aldk_tf.deploy.serving`.

A version directory is written under a temporary name and renamed when complete, so TF
Serving (which only loads numeric directory names) never sees a partial version. The
exporter holds a lock on its temporary folder; folders of exports killed before the rename
(nobody holds their lock) are removed by the next export into the same base.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import tempfile
import time

import numpy as np
import tensorflow as tf

from aldk_tf import spatial
from aldk_tf.deploy.export_layout import (DTYPES, INFO_NAME, SERVING_SIGNATURE,  # noqa: F401
                                          TFLITE_DIR, TFLITE_VARIANTS, WARP_SIGNATURE,
                                          ExportError, make_readable, make_writable_folder,
                                          next_version, prepare_base,
                                          remove_if_new_and_empty)
from aldk_tf.deploy.inference import inference_graph, model_image_size
from aldk_tf.deploy.serving import (convert_tflite, parity_report, registration_graph,
                                    save_savedmodel, savedmodel_runner, tflite_runner)

logger = logging.getLogger(__name__)

WARMUP_PATH = os.path.join("assets.extra", "tf_serving_warmup_requests")


#: Largest flow difference (voxels) allowed between a bfloat16 SavedModel and the float32
#: Keras model: bfloat16 keeps ~3 significant digits (0.06 voxel measured on the shipped
#: student over 30 test pairs, Dice unchanged to 1e-4; bench/bf16_dice.py).
BFLOAT16_TOLERANCE = 0.25


def export_model(model, base: str, version: int | None = None,
                 tflite=TFLITE_VARIANTS, sample: dict | None = None,
                 label_values=None, tolerance: float = 1e-4,
                 info: dict | None = None, portable: bool = False,
                 subpixel: bool = True, dtype: str = "float32",
                 warmup: bool = True) -> dict:
    """Write ``base/<version>/`` (SavedModel + TFLite variants) and check parity.

    ``sample`` (``fixed``/``moving`` ``[B, D, H, W, 1]``, optional segmentations) is the
    input of the parity check; the SavedModel and the fp32 TFLite model must give the
    Keras model's flow to ``tolerance`` or nothing is written. ``subpixel``: the
    SavedModel runs :func:`aldk_tf.deploy.inference.inference_graph` (stride-2 flow heads as
    forward convolutions, ~3x faster on CPU) instead of the Keras graph. ``dtype``
    "bfloat16": the SavedModel's convolutions compute in bfloat16 (inputs and outputs stay
    float32; for CPUs with AMX or AVX512-BF16), checked to
    ``max(tolerance, BFLOAT16_TOLERANCE)``; TFLite stays float32. ``warmup``: write TF
    Serving's warm-up requests (one sample pair; ``False`` for a model shipped where size
    matters). Returns the export info (also saved as ``export_info.json``): ``path``,
    ``version``, ``dtype``, ``parity``...
    """
    if dtype not in DTYPES:
        raise ExportError(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    prepare_base(base)
    version = next_version(base) if version is None else int(version)
    if version < 1:
        raise ExportError(f"--version must be a positive integer, got {version}")
    final = os.path.join(base, str(version))
    if os.path.exists(final):
        raise ExportError(f"{final}: version {version} already exists (choose another "
                          f"--version, or omit it for {next_version(base)})")
    unknown = [v for v in tflite if v not in TFLITE_VARIANTS]
    if unknown:
        raise ExportError(f"unknown TFLite variant(s) {unknown} (known: "
                          f"{', '.join(TFLITE_VARIANTS)})")
    graph = registration_graph(model)
    size = model_image_size(graph)
    if sample is None:
        sample = synthetic_sample(size)
    remove_abandoned_staging(base)
    staging = tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=base)
    held = _hold(staging)                 # released (closed) when this export ends
    try:
        # The SavedModel serves the inference graph (sub-pixel flow heads, as timed by
        # bench/inference.py); TFLite converts the Keras graph (its depth-to-space needs
        # a rank-8 transpose, which TFLite lacks). Both are checked against the Keras graph.
        save_savedmodel(inference_graph(model, dtype=dtype, subpixel=subpixel), staging,
                        portable=portable)
        fixed, moving = sample["fixed"], sample["moving"]
        reference = {key: np.asarray(value) for key, value in
                     graph({"fixed": fixed, "moving": moving}, training=False).items()}
        candidates = {"savedmodel": savedmodel_runner(staging)(fixed, moving)}
        files = {}
        if tflite:
            os.makedirs(os.path.join(staging, TFLITE_DIR))
        for variant in tflite:
            flatbuffer = convert_tflite(graph, variant)
            name = os.path.join(TFLITE_DIR, f"model_{variant}.tflite")
            with open(os.path.join(staging, name), "wb") as handle:
                handle.write(flatbuffer)
            files[variant] = name
            candidates[f"tflite_{variant}"] = tflite_runner(flatbuffer)(fixed, moving)
        parity = parity_report(reference, candidates, sample, label_values)
        requests = (write_warmup_requests(staging, sample,
                                          os.path.basename(os.path.abspath(base)))
                    if warmup else None)
        limits = {"savedmodel": tolerance if dtype == "float32"
                  else max(tolerance, BFLOAT16_TOLERANCE), "tflite_fp32": tolerance}
        for name, limit in limits.items():
            if name in parity and not parity[name]["max_abs_flow_diff"] <= limit:
                raise ExportError(
                    f"parity check failed: {name} flow differs from the Keras model's by "
                    f"{parity[name]['max_abs_flow_diff']:.3g} > {limit:g}")
        record = {**(info or {}), "version": version, "image_size": list(size),
                  "xla": not portable, "subpixel_flow_heads": bool(subpixel),
                  "dtype": dtype,
                  "signatures": {SERVING_SIGNATURE: {"inputs": ["fixed", "moving"],
                                                     "outputs": ["flow", "warped"]},
                                 WARP_SIGNATURE: {"inputs": ["segmentation", "flow"],
                                                  "outputs": ["warped_segmentation"]}},
                  "tflite": files, "parity_tolerance": tolerance, "parity": parity,
                  "warmup_requests": requests}
        with open(os.path.join(staging, INFO_NAME), "w") as handle:
            json.dump(record, handle, indent=2)
            handle.write("\n")
        make_readable(staging)
        os.rename(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        os.close(held)
    return {**record, "path": final}


def warmup_logs(sample: dict, model_name: str):
    """``PredictionLog`` protos, one per signature, whose requests carry ``sample``
    (``fixed``/``moving`` ``[1, D, H, W, 1]``); None without tensorflow-serving-api."""
    try:
        from tensorflow_serving.apis import (model_pb2, predict_pb2,
                                             prediction_log_pb2)
    except ImportError:
        return None
    fixed = np.asarray(sample["fixed"][:1], np.float32)
    moving = np.asarray(sample["moving"][:1], np.float32)
    inputs = {SERVING_SIGNATURE: {"fixed": fixed, "moving": moving},
              WARP_SIGNATURE: {"segmentation": np.zeros_like(fixed),
                               "flow": np.zeros((*fixed.shape[:4], 3), np.float32)}}
    logs = []
    for signature, tensors in inputs.items():
        request = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(
            name=model_name, signature_name=signature))
        for name, value in tensors.items():
            request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
        logs.append(prediction_log_pb2.PredictionLog(
            predict_log=prediction_log_pb2.PredictLog(request=request)))
    return logs


def write_warmup_requests(version_dir: str, sample: dict, model_name: str) -> str:
    """Write ``assets.extra/tf_serving_warmup_requests`` (TFRecord of PredictionLog
    records, TF Serving's warm-up format); returns what was done, for the export info."""
    logs = warmup_logs(sample, model_name)
    if logs is None:
        return ("skipped: tensorflow-serving-api is not installed (pip install "
                "'aldk-tf[serving]'), so the first request pays the compilation")
    os.makedirs(os.path.dirname(os.path.join(version_dir, WARMUP_PATH)), exist_ok=True)
    with tf.io.TFRecordWriter(os.path.join(version_dir, WARMUP_PATH)) as writer:
        for log in logs:
            writer.write(log.SerializeToString())
    return WARMUP_PATH
def _hold(folder: str) -> int:
    """An exclusive lock on ``folder`` (the returned descriptor holds it until closed;
    the OS drops it when the process ends, however it ends)."""
    descriptor = os.open(folder, os.O_RDONLY)
    fcntl.flock(descriptor, fcntl.LOCK_EX)
    return descriptor


def remove_abandoned_staging(base: str, min_age: float = 60.0) -> list[str]:
    """Remove the temporary folders (``.tmp-*``) of exports that died before their
    rename: unlocked and older than ``min_age`` seconds (a folder just made may not be
    locked yet). Returns the removed paths."""
    removed = []
    for name in sorted(os.listdir(base)):
        path = os.path.join(base, name)
        if not (name.startswith(".tmp-") and os.path.isdir(path)
                and time.time() - os.path.getmtime(path) > min_age):
            continue
        descriptor = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue                      # a running export holds it
        finally:
            os.close(descriptor)
        shutil.rmtree(path, ignore_errors=True)
        logger.warning("%s: removed the folder of an export that did not finish", path)
        removed.append(path)
    return removed


def synthetic_sample(image_size, seed: int = 0) -> dict:
    """A smooth random (fixed, moving) pair for the parity check when no data is given."""
    rng = np.random.default_rng(seed)
    coarse_size = [max(2, n // 8) for n in image_size]
    coarse = tf.constant(rng.random((2, *coarse_size, 1)), tf.float32)
    # Trilinear upsampling: full-resolution voxel i samples coarse position i * scale.
    scale = [(c - 1) / max(n - 1, 1) for c, n in zip(coarse_size, image_size)]
    coordinate = spatial.voxel_grid(image_size) * tf.constant(scale, tf.float32)
    volumes = spatial.sample(coarse, tf.stack([coordinate] * 2)).numpy()
    return {"fixed": volumes[:1], "moving": volumes[1:]}
