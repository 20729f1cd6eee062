"""Export for deployment: a SavedModel laid out for TF Serving, TFLite variants, parity.

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

Signatures of the SavedModel:

- ``serving_default``: ``fixed``, ``moving`` ``[B, D, H, W, 1]`` float32 in [0, 1] ->
  ``flow`` ``[B, D, H, W, 3]`` (voxels), ``warped`` ``[B, D, H, W, 1]``.
- ``warp_segmentation``: ``segmentation`` ``[B, D, H, W, 1]`` float32 label values,
  ``flow`` ``[B, D, H, W, 3]`` -> ``warped_segmentation`` (label values), warped by
  :func:`aldk_tf.spatial.warp_labels`, the function the evaluation uses.

A version directory is written under a temporary name and renamed when complete, so TF
Serving (which only loads numeric directory names) never sees a partial version. The
exporter holds a lock on its temporary folder; folders of exports killed before the rename
(nobody holds their lock) are removed by the next export into the same base.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
import warnings

import keras
import numpy as np
import tensorflow as tf

from aldk_tf import metrics, spatial
from aldk_tf.deploy.inference import inference_graph

logger = logging.getLogger(__name__)

SERVING_SIGNATURE = "serving_default"
WARP_SIGNATURE = "warp_segmentation"
TFLITE_VARIANTS = ("fp32", "fp16", "int8")
TFLITE_DIR = "tflite"
INFO_NAME = "export_info.json"
WARMUP_PATH = os.path.join("assets.extra", "tf_serving_warmup_requests")


class ExportError(ValueError):
    """An export that cannot be done (one-line message naming the path or the value)."""


# ----------------------------------------------------------------------------- graphs
def registration_graph(model) -> keras.Model:
    """The inference-only graph (``{"fixed", "moving"} -> {"flow", "warped"}``)."""
    if hasattr(model, "registration_model"):
        return model.registration_model()
    return model


def model_image_size(model) -> tuple[int, int, int]:
    shape = model.input["fixed"].shape if isinstance(model.input, dict) else \
        model.input[0].shape
    return tuple(int(n) for n in shape[1:4])


class RegistrationModule(tf.Module):
    """A ``tf.Module`` holding the registration graph and its serving functions.

    ``register(fixed, moving)`` and ``warp_segmentation(segmentation, flow)`` are
    ``tf.function`` s with fixed input signatures (``batch=None`` for a dynamic batch).
    """

    def __init__(self, model, batch: int | None = None):
        super().__init__(name="aldk_registration")
        self.registration = registration_graph(model)
        # Keras 3 models are not tf.Modules: list the variables so that SavedModel and the
        # TFLite converter find (and freeze) them.
        self.model_variables = [weight.value for weight in self.registration.weights]
        depth, height, width = model_image_size(self.registration)
        image = tf.TensorSpec([batch, depth, height, width, 1], tf.float32)
        flow = tf.TensorSpec([batch, depth, height, width, 3], tf.float32)
        self.register = tf.function(self._register, input_signature=[image, image])
        self.warp_segmentation = tf.function(self._warp_segmentation,
                                             input_signature=[image, flow])

    def _register(self, fixed, moving):
        outputs = self.registration({"fixed": fixed, "moving": moving}, training=False)
        return {"flow": outputs["flow"], "warped": outputs["warped"]}

    def _warp_segmentation(self, segmentation, flow):
        # The evaluation's label warp (metrics.warp_segmentation calls the same function).
        return {"warped_segmentation": spatial.warp_labels(segmentation, flow, "threshold")}


def save_savedmodel(model, path: str, portable: bool = False) -> None:
    """Write the SavedModel (both signatures, dynamic batch) to ``path``.

    The library's warp is traced with ``jit_compile=True``; by default the SavedModel
    keeps it that way (TensorFlow's Python and C++ loaders compile it: the exported model
    runs as fast as in-process). TF Serving runs XLA on CPU only with
    ``--xla_cpu_compilation_enabled=true``; ``portable=True`` removes the XLA marks so the
    same ops run without XLA on any server (the warp is then several times slower).
    """
    module = RegistrationModule(model)
    tf.saved_model.save(module, path, signatures={
        SERVING_SIGNATURE: module.register,
        WARP_SIGNATURE: module.warp_segmentation})
    if portable:
        strip_xla_must_compile(path)


XLA_MUST_COMPILE = "_XlaMustCompile"


def strip_xla_must_compile(path: str) -> int:
    """Remove the ``_XlaMustCompile`` marks from a SavedModel's graph; returns how many.

    The fingerprint (a checksum of ``saved_model.pb``) is rewritten to match.
    """
    from tensorflow.core.protobuf import saved_model_pb2

    proto_path = os.path.join(path, "saved_model.pb")
    saved_model = saved_model_pb2.SavedModel()
    with open(proto_path, "rb") as handle:
        saved_model.ParseFromString(handle.read())
    removed = 0
    for meta_graph in saved_model.meta_graphs:
        graph = meta_graph.graph_def
        holders = [node.attr for node in graph.node]
        for function in graph.library.function:
            holders.append(function.attr)
            holders.extend(node.attr for node in function.node_def)
        for attributes in holders:
            if XLA_MUST_COMPILE in attributes:
                del attributes[XLA_MUST_COMPILE]
                removed += 1
    if removed:
        with open(proto_path, "wb") as handle:
            handle.write(saved_model.SerializeToString())
        _rewrite_fingerprint(path)
    return removed


def _rewrite_fingerprint(path: str) -> None:
    fingerprint = os.path.join(path, "fingerprint.pb")
    try:
        from tensorflow.python.saved_model import fingerprinting_utils
        os.remove(fingerprint)
        fingerprinting_utils.write_fingerprint(path)
    except (ImportError, AttributeError, OSError) as error:   # private TF helper
        logger.warning("SavedModel fingerprint not rewritten (%s); removed instead", error)
        if os.path.exists(fingerprint):
            os.remove(fingerprint)


# ----------------------------------------------------------------------------- TFLite
def convert_tflite(model, variant: str = "fp32") -> bytes:
    """A TFLite flatbuffer (batch 1, builtin ops only) of the registration graph.

    ``fp16``: float16 weights (``optimizations=[DEFAULT]`` + ``supported_types=[float16]``);
    ``int8``: dynamic-range quantisation (``optimizations=[DEFAULT]``).
    """
    if variant not in TFLITE_VARIANTS:
        raise ExportError(f"unknown TFLite variant '{variant}' (known: "
                          f"{', '.join(TFLITE_VARIANTS)})")
    module = RegistrationModule(model, batch=1)
    function = module.register.get_concrete_function()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([function], module)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if variant != "fp32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if variant == "fp16":
        converter.target_spec.supported_types = [tf.float16]
    try:
        return converter.convert()
    except Exception as error:  # the converter raises its own ConverterError types
        first = next((line for line in str(error).splitlines() if "error:" in line),
                     str(error).splitlines()[0] if str(error) else repr(error))
        raise ExportError(f"TFLite conversion ({variant}) failed: {first.strip()}") \
            from None


def check_flatbuffer(content: bytes) -> None:
    """ValueError unless ``content`` parses whole as a TFLite model: the interpreter does
    not verify its input, and a truncated file crashes the process (segfault)."""
    from tensorflow.lite.python import schema_py_generated as schema
    if content[4:8] != b"TFL3":
        raise ValueError("no TFL3 file identifier")
    try:
        model = schema.ModelT.InitFromPackedBuf(content, 0)
    except Exception as error:  # noqa: BLE001  struct/flatbuffers errors on a cut file
        raise ValueError(f"truncated or corrupt flatbuffer ({error})") from None
    for buffer in model.buffers or []:
        if buffer.offset and buffer.offset + buffer.size > len(content):
            raise ValueError("truncated: a weight buffer lies beyond the end of the file")


def _interpreter(path_or_bytes):
    """A ``tf.lite.Interpreter`` over a model file or its bytes, checked first."""
    if isinstance(path_or_bytes, (bytes, bytearray)):
        content = bytes(path_or_bytes)
    else:
        with open(path_or_bytes, "rb") as handle:
            content = handle.read()
    check_flatbuffer(content)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # tf.lite.Interpreter's deprecation notice
        return tf.lite.Interpreter(model_content=content)


def tflite_runner(path_or_bytes):
    """``run(fixed, moving) -> {"flow", "warped"}`` over a TFLite model (batch 1)."""
    interpreter = _interpreter(path_or_bytes)
    signature = interpreter.get_signature_runner(SERVING_SIGNATURE)

    def run(fixed, moving):
        outputs = [signature(fixed=np.asarray(f[None], np.float32),
                             moving=np.asarray(m[None], np.float32))
                   for f, m in zip(fixed, moving)]
        return {key: np.concatenate([out[key] for out in outputs]) for key in
                ("flow", "warped")}
    run.image_size = tuple(int(n) for n in
                           signature.get_input_details()["fixed"]["shape"][1:4])
    return run


def tflite_ops(path_or_bytes) -> list[str]:
    """The sorted op names of a TFLite model (to check it is builtin-only)."""
    interpreter = _interpreter(path_or_bytes)
    return sorted({op["op_name"] for op in interpreter._get_ops_details()})


def savedmodel_runner(path: str):
    """``run(fixed, moving) -> {"flow", "warped"}`` over a reloaded SavedModel."""
    loaded = tf.saved_model.load(path)       # kept: signatures hold weak variable refs
    signature = loaded.signatures[SERVING_SIGNATURE]

    def run(fixed, moving):
        outputs = signature(fixed=tf.constant(fixed, tf.float32),
                            moving=tf.constant(moving, tf.float32))
        return {key: outputs[key].numpy() for key in ("flow", "warped")}
    run.loaded = loaded
    _, inputs = signature.structured_input_signature
    run.image_size = tuple(int(n) for n in inputs["fixed"].shape[1:4])
    return run


# ----------------------------------------------------------------------------- parity
def parity_report(reference: dict, candidates: dict, sample: dict | None = None,
                  label_values=None) -> dict[str, dict]:
    """Differences of each candidate's outputs from the Keras reference outputs.

    Args:
      reference: ``{"flow", "warped"}`` numpy outputs of the Keras model.
      candidates: ``{name: {"flow", "warped"}}``.
      sample: the pair the outputs were computed on; with ``fixed_seg``/``moving_seg`` the
        report includes the Dice of each flow (library metrics) and its change.
    Returns ``{name: {max_abs_flow_diff, mean_abs_flow_diff, max_abs_warped_diff,
    [dice, dice_change]}}``.
    """
    with_dice = sample is not None and "fixed_seg" in sample and \
        np.any(sample["fixed_seg"])
    reference_dice = None
    if with_dice:
        reference_dice = _mean_dice(sample, reference["flow"], label_values)
    report = {}
    for name, outputs in candidates.items():
        flow_diff = np.abs(outputs["flow"] - reference["flow"])
        entry = {"max_abs_flow_diff": float(flow_diff.max()),
                 "mean_abs_flow_diff": float(flow_diff.mean()),
                 "max_abs_warped_diff": float(np.abs(outputs["warped"] -
                                                     reference["warped"]).max())}
        if with_dice:
            dice = _mean_dice(sample, outputs["flow"], label_values)
            entry.update(dice=dice, dice_change=dice - reference_dice)
        report[name] = entry
    if with_dice:
        report["keras"] = {"dice": reference_dice}
    return report


def _mean_dice(sample, flow, label_values) -> float:
    result = metrics.pair_metrics(sample["fixed_seg"], sample["moving_seg"], flow,
                                  label_values)
    return float(np.nanmean(result["dice"]))


def format_parity(report: dict[str, dict]) -> str:
    """A small text table of :func:`parity_report`."""
    lines = [f"{'vs keras':<14}{'max |dflow|':>13}{'mean |dflow|':>14}"
             f"{'max |dwarped|':>15}{'dice':>9}{'d dice':>10}"]
    for name, entry in report.items():
        if name == "keras":
            continue
        dice = entry.get("dice")
        lines.append(f"{name:<14}{entry['max_abs_flow_diff']:>13.3g}"
                     f"{entry['mean_abs_flow_diff']:>14.3g}"
                     f"{entry['max_abs_warped_diff']:>15.3g}"
                     + (f"{dice:>9.4f}{entry['dice_change']:>+10.2g}" if dice is not None
                        else f"{'-':>9}{'-':>10}"))
    if "keras" in report:
        lines.append(f"{'keras':<14}{'':>42}{report['keras']['dice']:>9.4f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- export
def next_version(base: str) -> int:
    """One more than the largest numeric version directory under ``base`` (or 1)."""
    if not os.path.isdir(base):
        return 1
    versions = [int(name) for name in os.listdir(base) if name.isdigit()]
    return max(versions, default=0) + 1


def prepare_base(base: str) -> None:
    """Create ``base`` and check that a file can be written in it (ExportError if not)."""
    try:
        os.makedirs(base, exist_ok=True)
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as error:
        raise ExportError(f"{base}: output directory not writable "
                          f"({error.strerror or error})") from None


def remove_if_new_and_empty(base: str, existed: bool) -> None:
    """Remove ``base`` when it did not exist before the command (``existed``) and holds
    nothing: a command that failed leaves no empty output folder behind."""
    if not existed:
        with contextlib.suppress(OSError):
            os.rmdir(base)


def export_model(model, base: str, version: int | None = None,
                 tflite=TFLITE_VARIANTS, sample: dict | None = None,
                 label_values=None, tolerance: float = 1e-4,
                 info: dict | None = None, portable: bool = False,
                 subpixel: bool = True) -> dict:
    """Write ``base/<version>/`` (SavedModel + TFLite variants) and check parity.

    ``sample`` (``fixed``/``moving`` ``[B, D, H, W, 1]``, optional segmentations) is the
    input of the parity check; the SavedModel and the fp32 TFLite model must give the
    Keras model's flow to ``tolerance`` or nothing is written. ``subpixel``: the
    SavedModel runs :func:`aldk_tf.deploy.inference.inference_graph` (stride-2 flow heads as
    forward convolutions, ~3x faster on CPU) instead of the Keras graph. Returns the
    export info (also saved as ``export_info.json``): ``path``, ``version``, ``parity``...
    """
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
        save_savedmodel(inference_graph(model) if subpixel else graph, staging,
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
        warmup = write_warmup_requests(staging, sample,
                                       os.path.basename(os.path.abspath(base)))
        for name in ("savedmodel", "tflite_fp32"):
            if name in parity and not parity[name]["max_abs_flow_diff"] <= tolerance:
                raise ExportError(
                    f"parity check failed: {name} flow differs from the Keras model's by "
                    f"{parity[name]['max_abs_flow_diff']:.3g} > {tolerance:g}")
        record = {**(info or {}), "version": version, "image_size": list(size),
                  "xla": not portable, "subpixel_flow_heads": bool(subpixel),
                  "signatures": {SERVING_SIGNATURE: {"inputs": ["fixed", "moving"],
                                                     "outputs": ["flow", "warped"]},
                                 WARP_SIGNATURE: {"inputs": ["segmentation", "flow"],
                                                  "outputs": ["warped_segmentation"]}},
                  "tflite": files, "parity_tolerance": tolerance, "parity": parity,
                  "warmup_requests": warmup}
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


def make_readable(folder: str) -> None:
    """Give the staging directory (``mkdtemp``: 0700) the usual umask permissions, so a
    model server running as another user can read the version directory."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)


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
