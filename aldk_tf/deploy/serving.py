"""The SavedModel and TFLite forms of a registration model, and their parity.

Signatures of the SavedModel (:func:`save_savedmodel`):

- ``serving_default``: ``fixed``, ``moving`` ``[B, D, H, W, 1]`` float32 in [0, 1] ->
  ``flow`` ``[B, D, H, W, 3]`` (voxels), ``warped`` ``[B, D, H, W, 1]``.
- ``warp_segmentation``: ``segmentation`` ``[B, D, H, W, 1]`` float32 label values,
  ``flow`` ``[B, D, H, W, 3]`` -> ``warped_segmentation`` (label values), warped by
  :func:`aldk_tf.spatial.warp_labels`, the function the evaluation uses.

TFLite (:func:`convert_tflite`): batch 1, builtin ops only, fp32 / fp16 / int8 weights.
:func:`parity_report` compares the forms' flows (and Dice) with the Keras model's. The
versioned export directory that holds them all: :mod:`aldk_tf.deploy.export`.
"""

from __future__ import annotations

import logging
import os
import warnings

import keras
import numpy as np
import tensorflow as tf

from aldk_tf import metrics, spatial
from aldk_tf.deploy.export_layout import (INFO_NAME, SERVING_SIGNATURE,  # noqa: F401
                                          TFLITE_DIR, TFLITE_VARIANTS, WARP_SIGNATURE,
                                          ExportError)
from aldk_tf.deploy.inference import model_image_size

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- graphs
def registration_graph(model) -> keras.Model:
    """The inference-only graph (``{"fixed", "moving"} -> {"flow", "warped"}``)."""
    if hasattr(model, "registration_model"):
        return model.registration_model()
    return model


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
