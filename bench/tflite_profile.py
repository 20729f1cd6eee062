"""Where TFLite loses: every convolution of a registration model, alone, in TFLite and in
TensorFlow, on the same machine in the same run.

    python bench/tflite_profile.py [--model student_1] [--size 128] [--repeats 5]
                                   [--json PATH]

For each ``Conv3D`` / ``Conv3DTranspose`` layer of the model (as ``export.py`` converts it:
the Keras graph, transposed convolutions as they are), a one-layer Keras model with that
layer's input shape and weights is

- converted to TFLite (builtin ops only, float32) and run by ``tf.lite.Interpreter``
  (``num_threads`` = the CPU count), and
- run by TensorFlow as a ``tf.function`` (oneDNN), for the transposed convolutions also in
  the sub-pixel form the SavedModel uses (:func:`aldk_tf.deploy.inference.transposed_conv3d`).

Printed per layer: the TFLite op it becomes, median milliseconds of each, their ratio and
GFLOP/s (2 per multiply-add); then the sums, and one library warp (``spatial.warp``: XLA
in TensorFlow, TFLite ``GATHER`` ops in TFLite) timed the same way. The whole-model rows
(``tflite_fp32_student_1`` against ``savedmodel_student_1``) are ``bench/inference.py``'s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from aldk_tf import spatial  # noqa: E402
from aldk_tf.config import atomic_write_text  # noqa: E402
from aldk_tf.deploy.inference import _all_layers, transposed_conv3d  # noqa: E402
from aldk_tf.networks import build_student, build_teacher  # noqa: E402

try:                                 # python -m bench.<script>; imported from the root (tests)
    from bench.inference_rows import smooth_flow
except ModuleNotFoundError:          # python bench/<script>.py: sys.path[0] is bench/
    from inference_rows import smooth_flow

MODELS = {
    "student_1": lambda size: build_student(size, 1),
    "student_crd_1": lambda size: build_student(size, 1, resolution_factor=2),
    "teacher_affine_vtn1": lambda size: build_teacher(size, 1),
}
CONVOLUTIONS = (keras.layers.Conv3D, keras.layers.Conv3DTranspose)


def median_ms(call, repeats: int) -> float:
    call()                                            # allocation, tracing
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def layer_flop(layer, input_shape) -> float:
    """2 x multiply-adds: output voxels x taps x channels (Conv3D); input voxels x taps x
    channels (Conv3DTranspose)."""
    taps = int(np.prod(layer.kernel_size))
    channels_in = int(input_shape[-1])
    if isinstance(layer, keras.layers.Conv3DTranspose):
        voxels = int(np.prod(input_shape[1:4]))
    else:
        voxels = int(np.prod(layer.compute_output_shape(input_shape)[1:4]))
    return 2.0 * voxels * taps * channels_in * layer.filters


def single_layer(layer, input_shape) -> keras.Model:
    """A one-layer model with ``layer``'s configuration and weights."""
    copy = type(layer).from_config(layer.get_config())
    inputs = keras.Input(shape=tuple(input_shape[1:]), batch_size=1)
    outputs = copy(inputs)
    copy.set_weights(layer.get_weights())
    return keras.Model(inputs, outputs)


def tflite_runner(model):
    # A Keras 3 model is not a tf.Module: the converter finds (and freezes) its weights
    # only through a module that lists them, as aldk_tf.deploy.serving does.
    module = tf.Module()
    module.model_variables = [weight.value for weight in model.weights]
    module.call = tf.function(lambda x: model(x, training=False),
                              input_signature=[tf.TensorSpec(model.input.shape, tf.float32)])
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [module.call.get_concrete_function()], module)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    content = converter.convert()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")         # tf.lite.Interpreter deprecation notice
        interpreter = tf.lite.Interpreter(model_content=content,
                                          num_threads=os.cpu_count() or 1)
    interpreter.allocate_tensors()
    ops = sorted({detail["op_name"] for detail in interpreter._get_ops_details()})
    return interpreter, [op for op in ops if "CONV" in op] or ops


def profile_layer(layer, input_shape, repeats: int, rng) -> dict:
    x = rng.standard_normal(input_shape).astype(np.float32)
    model = single_layer(layer, input_shape)
    in_tf = tf.function(lambda v: model(v, training=False))
    tensor = tf.constant(x)
    result = {"input": list(input_shape[1:]), "filters": layer.filters,
              "kernel": list(layer.kernel_size), "strides": list(layer.strides),
              "gflop": layer_flop(layer, input_shape) / 1e9,
              "tensorflow_ms": median_ms(lambda: in_tf(tensor).numpy(), repeats)}
    if isinstance(layer, keras.layers.Conv3DTranspose) and tuple(layer.kernel_size) == (
            4, 4, 4):
        copy = model.layers[-1]
        subpixel = tf.function(lambda v: transposed_conv3d(
            v, copy.kernel, copy.bias, copy.activation))
        result["tensorflow_subpixel_ms"] = median_ms(lambda: subpixel(tensor).numpy(),
                                                     repeats)
    interpreter, ops = tflite_runner(model)
    index_in = interpreter.get_input_details()[0]["index"]
    index_out = interpreter.get_output_details()[0]["index"]

    def run_tflite():
        interpreter.set_tensor(index_in, x)
        interpreter.invoke()
        return interpreter.get_tensor(index_out)
    result["tflite_ms"] = median_ms(run_tflite, repeats)
    result["tflite_ops"] = ops
    result["max_abs_difference"] = float(np.abs(run_tflite() - in_tf(tensor).numpy()).max())
    return result


def profile_warp(size: int, repeats: int, rng) -> dict:
    """The library warp (a 1-channel image by the smooth flow of ``bench/inference_rows.py``'s
    warp row) in TFLite
    (builtin ops: the gathers of the XLA function run as TFLite GATHER ops) and in
    TensorFlow (XLA)."""
    image = rng.random((1, size, size, size, 1)).astype(np.float32)
    flow = smooth_flow(size)             # the inference benchmark's warp-row flow
    specs = [tf.TensorSpec(image.shape, tf.float32), tf.TensorSpec(flow.shape, tf.float32)]
    function = tf.function(spatial.warp, input_signature=specs)
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [function.get_concrete_function()])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        interpreter = tf.lite.Interpreter(model_content=converter.convert(),
                                          num_threads=os.cpu_count() or 1)
    interpreter.allocate_tensors()
    inputs = [detail["index"] for detail in interpreter.get_input_details()]
    output = interpreter.get_output_details()[0]["index"]

    def run_tflite():
        for index, value in zip(inputs, (image, flow)):
            interpreter.set_tensor(index, value)
        interpreter.invoke()
        return interpreter.get_tensor(output)
    tensors = [tf.constant(image), tf.constant(flow)]
    difference = float(np.abs(run_tflite() - function(*tensors).numpy()).max())
    return {"tensorflow_ms": median_ms(lambda: function(*tensors).numpy(), repeats),
            "tflite_ms": median_ms(run_tflite, repeats), "max_abs_difference": difference}


def conv_layers(model):
    """``(layer, input shape)`` of every convolution the model calls, in order."""
    for layer in _all_layers(model):
        if isinstance(layer, CONVOLUTIONS):
            yield layer, (1, *layer.input.shape[1:])


def format_table(results: dict) -> list[str]:
    lines = [f"{'layer':28s}{'input':>20s}{'out':>5s} {'TFLite op':22s}{'TF ms':>8s}"
             f"{'TFLite ms':>10s}{'ratio':>7s}{'TF GF/s':>9s}{'TFL GF/s':>9s}"]
    for name, entry in results["layers"].items():
        ops = ",".join(entry["tflite_ops"])
        tf_ms = entry.get("tensorflow_subpixel_ms", entry["tensorflow_ms"])
        lines.append(
            f"{name:28s}{'x'.join(map(str, entry['input'])):>20s}{entry['filters']:5d} "
            f"{ops:22s}{tf_ms:8.1f}{entry['tflite_ms']:10.1f}"
            f"{entry['tflite_ms'] / tf_ms:7.1f}{entry['gflop'] / tf_ms * 1e3:9.1f}"
            f"{entry['gflop'] / entry['tflite_ms'] * 1e3:9.1f}")
    totals = results["totals"]
    lines.append(f"{'all convolutions':54s}{totals['tensorflow_ms']:8.1f}"
                 f"{totals['tflite_ms']:10.1f}"
                 f"{totals['tflite_ms'] / totals['tensorflow_ms']:7.1f}")
    warp = results["warp"]
    lines.append(f"{'one warp (spatial.warp, GATHER in TFLite)':54s}"
                 f"{warp['tensorflow_ms']:8.1f}{warp['tflite_ms']:10.1f}"
                 f"{warp['tflite_ms'] / warp['tensorflow_ms']:7.1f}")
    lines.append("TF ms: TensorFlow/oneDNN as the SavedModel runs the layer (sub-pixel form "
                 "for the kernel-4 transposed convolutions)")
    return lines


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="student_1", choices=sorted(MODELS))
    parser.add_argument("--size", type=int, default=128, help="volume size S (S^3)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.size < 16 or args.size % 32:
        parser.error(f"--size: expected a multiple of 32 (>= 32), got {args.size}")
    if args.repeats < 1:
        parser.error(f"--repeats: expected >= 1, got {args.repeats}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    keras.utils.set_random_seed(0)
    model = MODELS[args.model]((args.size,) * 3)
    rng = np.random.default_rng(0)
    results = {"model": args.model, "size": args.size, "threads": os.cpu_count(),
               "layers": {}}
    for layer, shape in conv_layers(model):
        results["layers"][layer.name] = profile_layer(layer, shape, args.repeats, rng)
        print(f"  {layer.name}: done", flush=True)
    layers = results["layers"].values()
    results["totals"] = {
        "tensorflow_ms": sum(e.get("tensorflow_subpixel_ms", e["tensorflow_ms"])
                             for e in layers),
        "tflite_ms": sum(e["tflite_ms"] for e in layers)}
    results["warp"] = profile_warp(args.size, args.repeats, rng)
    print(f"{args.model} at {args.size}^3, batch 1, median of {args.repeats}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print("\n".join(format_table(results)))
    if args.json:
        atomic_write_text(args.json, json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
