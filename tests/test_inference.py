"""aldk_tf/deploy/inference.py and bench/inference.py: fast paths against the reference, no timing.

Every fast path (fixed-signature function, sub-pixel flow heads, bfloat16 convolutions,
SavedModel of the prepared graph) is compared with the Keras model's outputs and with the
library warp; the benchmark script is run once at 32^3 for its JSON keys.
"""

import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from aldk_tf.deploy import export, serving

from aldk_tf import spatial
from aldk_tf.deploy.inference import (_all_layers, _concat_by_padding_xla, graph_ops,
                                      inference_graph, registration_function, slow_ops,
                                      transposed_conv3d)
from aldk_tf.layers import Scale
from aldk_tf.networks import build_student, build_teacher
from scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
SIZE = (32, 32, 32)
FLOAT32_TOLERANCE = 1e-5      # voxels; float rounding only
# bfloat16 keeps 8 significant bits: features carry ~0.4% relative error into the flow
# head (which stays float32). Measured on these perturbed 32^3 students: <= 0.012 voxel.
BFLOAT16_TOLERANCE = 0.05     # voxels


def perturbed(model, seed=0, scale=0.05):
    """Weights moved away from the initialisation (zero affine heads) so that flows reach
    a few voxels and comparisons can fail."""
    noise = np.random.default_rng(seed)
    model.set_weights([w + noise.normal(0, scale, w.shape).astype(w.dtype)
                       for w in model.get_weights()])
    return model


def smooth_pair(size=SIZE, seed=0):
    sample = export.synthetic_sample(size, seed=seed)
    return sample["fixed"].astype(np.float32), sample["moving"].astype(np.float32)


MODELS = {
    "student_1": lambda: perturbed(build_student(SIZE, 1)),
    "student_2": lambda: perturbed(build_student(SIZE, 2)),
    "student_crd_1": lambda: perturbed(build_student(SIZE, 1, resolution_factor=2)),
    # The teacher's flow heads start near zero: perturbed, its flows reach ~2 voxels.
    "teacher_1": lambda: perturbed(build_teacher(SIZE, 1), scale=0.005),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model_and_reference(request):
    keras.utils.set_random_seed(0)
    model = MODELS[request.param]()
    fixed, moving = smooth_pair()
    outputs = model({"fixed": fixed, "moving": moving}, training=False)
    reference = {key: outputs[key].numpy() for key in ("flow", "warped")}
    assert np.abs(reference["flow"]).max() > 0.5, "flows too small to test anything"
    return model, fixed, moving, reference


# ----------------------------------------------------------------------------- sub-pixel
@pytest.mark.parametrize("shape, filters", [
    ((1, 4, 4, 4, 8), 3), ((2, 5, 3, 6, 4), 3), ((1, 8, 8, 8, 16), 9),
    ((1, 3, 3, 3, 2), 1)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_transposed_conv3d_matches_conv3d_transpose(rng, shape, filters, with_bias):
    x = rng.standard_normal(shape).astype(np.float32)
    kernel = rng.standard_normal((4, 4, 4, filters, shape[-1])).astype(np.float32)
    bias = rng.standard_normal(filters).astype(np.float32) if with_bias else None
    out_shape = [shape[0], 2 * shape[1], 2 * shape[2], 2 * shape[3], filters]
    expected = tf.nn.conv3d_transpose(x, kernel, out_shape, [1, 2, 2, 2, 1], "SAME")
    if with_bias:
        expected = expected + bias
    ours = transposed_conv3d(x, kernel, bias)
    np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=1e-5)


def test_transposed_conv3d_applies_activation_and_checks_kernel(rng):
    x = rng.standard_normal((1, 4, 4, 4, 2)).astype(np.float32)
    kernel = rng.standard_normal((4, 4, 4, 3, 2)).astype(np.float32)
    plain = transposed_conv3d(x, kernel).numpy()
    activated = transposed_conv3d(x, kernel, activation=tf.nn.relu).numpy()
    np.testing.assert_allclose(activated, np.maximum(plain, 0.0), atol=1e-6)
    with pytest.raises(ValueError, match=r"\[4, 4, 4, filters, in\]"):
        transposed_conv3d(x, kernel[:3])


# ----------------------------------------------------------------------------- paths
@pytest.mark.parametrize("subpixel", [False, True])
def test_float32_function_matches_keras(model_and_reference, subpixel):
    model, fixed, moving, reference = model_and_reference
    register = registration_function(model, subpixel=subpixel)
    outputs = register(fixed, moving)
    assert outputs["flow"].dtype == tf.float32 and outputs["warped"].dtype == tf.float32
    np.testing.assert_allclose(outputs["flow"], reference["flow"], atol=FLOAT32_TOLERANCE,
                               rtol=1e-5)
    np.testing.assert_allclose(outputs["warped"], reference["warped"], atol=1e-5)


def test_bfloat16_function_within_tolerance(model_and_reference):
    model, fixed, moving, reference = model_and_reference
    outputs = registration_function(model, dtype="bfloat16")(fixed, moving)
    assert outputs["flow"].dtype == tf.float32 and outputs["warped"].dtype == tf.float32
    difference = np.abs(outputs["flow"].numpy() - reference["flow"])
    assert difference.max() <= BFLOAT16_TOLERANCE
    assert difference.max() > 0.0, "bfloat16 path computed in float32"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_warped_is_the_reference_warp_of_the_returned_flow(model_and_reference, dtype):
    """The warp/composition stay float32 in every path: the returned ``warped`` is the
    library warp (itself tested against scipy) of the original moving image by ``flow``."""
    model, fixed, moving, _ = model_and_reference
    outputs = registration_function(model, dtype=dtype)(fixed, moving)
    expected = spatial.warp(moving, outputs["flow"])
    np.testing.assert_allclose(outputs["warped"], expected, atol=1e-5)


def test_inference_graph_leaves_the_model_alone(rng):
    model = perturbed(build_student(SIZE, 1))
    graph = inference_graph(model, dtype="bfloat16")
    assert all(layer.dtype_policy.name == "float32" for layer in model.layers)
    head = model.get_layer("cascade_1").get_layer("cascade_1_flow_head")
    assert "call" not in vars(head)
    graph_layers = {id(layer) for layer in _all_layers(graph)}
    assert not graph_layers & {id(layer) for layer in _all_layers(model)}, \
        "the inference graph shares layers with the model"
    with pytest.raises(ValueError, match="dtype"):
        inference_graph(model, dtype="float16")


@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16])
def test_concat_by_padding_is_concat(rng, dtype):
    """The image-pair concatenation of the inference graph (zero-pad and add, one XLA
    loop) gives tf.concat's result exactly, for any widths and NaNs included."""
    parts = [rng.standard_normal((2, 3, 4, 5, width)).astype(np.float32) for width in (1, 2, 1)]
    parts[1][0, 0, 0, 0, 1] = np.nan
    parts = [tf.cast(part, dtype) for part in parts]
    ours = _concat_by_padding_xla(parts).numpy()
    np.testing.assert_array_equal(ours, tf.concat(parts, axis=-1).numpy())


def test_inference_graph_rewrites_pairs_and_keeps_geometry_float32():
    """Narrow concatenations (the image pairs) take the XLA form, wide ones (skips) stay;
    under bfloat16 the deformable flow head computes in bfloat16 while the affine stem's
    W and b heads and the pair stay float32."""
    model = build_student(SIZE, 1)
    graph = inference_graph(model, dtype="bfloat16")
    concats = [layer for layer in _all_layers(graph)
               if isinstance(layer, keras.layers.Concatenate)]
    narrow = {layer.name for layer in concats if "call" in vars(layer)}
    assert narrow == {layer.name for layer in concats if layer.output.shape[-1] <= 8}
    assert narrow and len(narrow) < len(concats)
    policy = {layer.name: layer.dtype_policy.name for layer in _all_layers(graph)}
    assert policy["cascade_1_flow_head"] == "mixed_bfloat16"
    assert policy["affine_stem_W"] == policy["affine_stem_b"] == "float32"
    assert all(policy[name] == "float32" for name in narrow)
    assert policy["cascade_1_conv2"] == "mixed_bfloat16"


def test_bfloat16_keeps_convolutions_on_inputs_smaller_than_their_kernel_float32():
    """A 32^3 teacher's deepest convolutions see 1-2 voxels under a 3x3x3 kernel: exactly
    those stay float32 under bfloat16 (oneDNN's bfloat16 weight gradient of them is
    garbage), every other convolution computes in bfloat16."""
    from aldk_tf.deploy.inference import use_bfloat16_layers
    model = use_bfloat16_layers(build_teacher(SIZE, 1))
    convs = [layer for layer in _all_layers(model)
             if isinstance(layer, keras.layers.Conv3D)
             and not isinstance(layer, keras.layers.Conv3DTranspose)
             and layer.filters not in (3, 9)]                 # not the affine heads
    small = {layer.name for layer in convs
             if min(layer.input.shape[1:4]) < layer.kernel_size[0]}
    assert {"affine_stem_conv10", "cascade_1_conv6_1", "cascade_1_conv5"} <= small
    for layer in convs:
        expected = "float32" if layer.name in small else "mixed_bfloat16"
        assert layer.dtype_policy.name == expected, layer.name


@pytest.mark.parametrize("size,stride", [(1, 2), (2, 1), (2, 2), (4, 2)])
def test_bfloat16_weight_gradients_match_float32(size, stride):
    """The kernel gradients of a small stack under ``use_bfloat16_layers`` agree with the
    float32 ones to bfloat16's rounding (<= 2 % of the largest entry here), also for
    convolutions on inputs smaller than their kernel (where oneDNN's own bfloat16
    gradient was 1e16 or NaN: without the float32 rule this fails on an AVX512-BF16
    CPU)."""
    from aldk_tf.deploy.inference import use_bfloat16_layers

    def stack():
        inputs = keras.Input((4 * size, 4 * size, 4 * size, 2), batch_size=2)
        x = keras.layers.Conv3D(8, 3, strides=2, padding="same", use_bias=False,
                                name="a")(inputs)
        x = keras.layers.Conv3D(16, 3, strides=2, padding="same", use_bias=False,
                                name="b")(x)
        x = keras.layers.Conv3D(16, 3, strides=stride, padding="same", use_bias=False,
                                name="c")(x)
        return keras.Model(inputs, x)

    keras.utils.set_random_seed(0)
    reference = stack()
    mixed = use_bfloat16_layers(stack())
    mixed.set_weights(reference.get_weights())
    x = tf.constant(np.random.default_rng(3).normal(size=(2, *(4 * size,) * 3, 2)),
                    tf.float32)
    gradients = []
    for model in (reference, mixed):
        for _ in range(3):                     # garbage reads vary from call to call
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.cast(model(x), tf.float32) ** 2)
            gradients.append(tape.gradient(loss, model.trainable_weights))
    for mixed_gradients in gradients[3:]:
        for g, r in zip(mixed_gradients, gradients[0]):
            g, r = g.numpy(), r.numpy()
            assert np.isfinite(g).all()
            assert np.abs(g - r).max() <= 0.05 * np.abs(r).max() + 1e-6


@pytest.mark.parametrize("subpixel", [True, False])
def test_flow_multipliers_fold_into_the_sub_pixel_flow_heads(subpixel):
    """Each cascade's flow multiplier (1/2 here) moves into its sub-pixel flow head, whose
    shuffle writes float32; without sub-pixel heads nothing changes. (The outputs are
    compared with the Keras model's in the tests above.)"""
    graph = inference_graph(build_student(SIZE, 2), dtype="bfloat16", subpixel=subpixel)
    scales = [layer for layer in _all_layers(graph) if isinstance(layer, Scale)
              and layer.name.endswith("_flow")]             # not the affine stem's gain
    heads = [layer for layer in _all_layers(graph) if layer.name.endswith("_flow_head")]
    assert len(scales) == len(heads) == 2
    assert all(("call" in vars(layer)) == subpixel for layer in scales + heads)
    if subpixel:
        assert [head._folded_factor for head in heads] == [0.5, 0.5]
        x = tf.zeros([1, 4, 4, 4, 32], tf.bfloat16)
        assert heads[0](x).dtype == tf.float32


def test_fixed_signature_rejects_other_shapes():
    register = registration_function(build_student(SIZE, 1))
    wrong = np.zeros((1, 16, 16, 16, 1), np.float32)
    with pytest.raises((TypeError, ValueError)):
        register(wrong, wrong)


def test_savedmodel_of_the_prepared_graph_matches_keras(model_and_reference, tmp_path):
    model, fixed, moving, reference = model_and_reference
    register = registration_function(model)
    serving.save_savedmodel(register.graph, str(tmp_path / "model"))
    outputs = serving.savedmodel_runner(str(tmp_path / "model"))(fixed, moving)
    np.testing.assert_allclose(outputs["flow"], reference["flow"], atol=FLOAT32_TOLERANCE,
                               rtol=1e-5)
    np.testing.assert_allclose(outputs["warped"], reference["warped"], atol=1e-5)


# ----------------------------------------------------------------------------- op check
def test_slow_ops_flags_thin_transposed_convs_only_in_the_keras_graph():
    model = build_student(SIZE, 1)
    stock = registration_function(model, subpixel=False).get_concrete_function()
    fast = registration_function(model).get_concrete_function()
    assert "Conv3DBackpropInputV2" in slow_ops(stock)
    assert slow_ops(fast) == {}
    # The wide (16+ channel) transposed convs stay: the sub-pixel form is no faster there.
    assert graph_ops(fast)["graph"]["Conv3DBackpropInputV2"] == 3
    assert graph_ops(fast)["xla"]["GatherV2"] > 0            # the warp's XLA cluster


def test_slow_ops_flags_gathers_outside_xla_and_python():
    spec = tf.TensorSpec([8], tf.float32)
    index = tf.constant([1, 2])
    plain = tf.function(lambda x: tf.gather(x, index), input_signature=[spec])
    compiled = tf.function(lambda x: tf.gather(x, index), jit_compile=True)
    nested = tf.function(lambda x: compiled(x), input_signature=[spec])
    python = tf.function(lambda x: tf.py_function(np.sort, [x], tf.float32),
                         input_signature=[spec])
    assert "GatherV2" in slow_ops(plain.get_concrete_function())
    assert slow_ops(nested.get_concrete_function()) == {}
    assert "EagerPyFunc" in slow_ops(python.get_concrete_function())


# ----------------------------------------------------------------------------- scripts
def load_bench(name):
    return load_script(f"bench/{name}.py")


def test_bench_row_names():
    bench = load_bench("inference")
    row = bench.parse_row("savedmodel_student_crd_1_bf16")
    assert (row.source, row.model, row.dtype, row.subpixel) == \
        ("savedmodel", "student_crd_1", "bfloat16", True)
    assert bench.parse_row("savedmodel_portable_student_1").source == "savedmodel_portable"
    assert bench.parse_row("tflite_int8_teacher_affine_vtn3").tflite == "int8"
    assert bench.parse_row("student_1_keras_upconv").subpixel is False
    assert bench.parse_row("student_1").batch == 1
    row = bench.parse_row("savedmodel_student_crd_1_bf16@b4")
    assert (row.source, row.model, row.dtype, row.batch) == \
        ("savedmodel", "student_crd_1", "bfloat16", 4)
    for name in bench.DEFAULT_ROWS:
        bench.parse_row(name)
    for bad in ("student_4", "tflite_fp32_student_1_bf16", "savedmodel_warp", "",
                "tflite_fp32_student_1@b2", "student_1@b0", "student_1@4", "warp@b2"):
        with pytest.raises(ValueError, match="unknown row"):
            bench.parse_row(bad)


@pytest.mark.slow
def test_tflite_profile_covers_every_convolution_and_agrees(tmp_path):
    """bench/tflite_profile.py: one entry per convolution of the model, each run in both
    runtimes with the same result, the TFLite op it became, and the warp."""
    out = tmp_path / "profile.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "tflite_profile.py"), "--model",
         "student_crd_1", "--size", "32", "--repeats", "1", "--json", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    profile = json.loads(out.read_text())
    model = build_student(SIZE, 1, resolution_factor=2)
    expected = [layer.name for layer in _all_layers(model)
                if isinstance(layer, (keras.layers.Conv3D, keras.layers.Conv3DTranspose))]
    assert list(profile["layers"]) == expected
    for name, entry in profile["layers"].items():
        assert entry["tflite_ops"] == (["CONV_3D_TRANSPOSE"] if "deconv" in name
                                       or "flow_head" in name else ["CONV_3D"]), name
        assert entry["max_abs_difference"] < 1e-3, name
        assert entry["tflite_ms"] > 0 and entry["tensorflow_ms"] > 0
    assert "tensorflow_subpixel_ms" in profile["layers"]["cascade_1_flow_head"]
    assert profile["warp"]["max_abs_difference"] < 1e-4
    assert "all convolutions" in result.stdout


@pytest.mark.slow
def test_bench_script_writes_the_required_rows(tmp_path):
    out = tmp_path / "results" / "out.json"          # the folder is created
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "inference.py"), "--size", "32",
         "--repeats", "1", "--peak", "quick", "--rows",
         "warp,student_1,savedmodel_student_1,student_1@b2",
         "--json", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    written = json.loads(out.read_text())
    results, peaks = written["rows"], written["machine"]
    assert list(results) == ["warp", "student_1", "savedmodel_student_1", "student_1@b2"]
    for entry in results.values():
        assert entry["median_ms"] > 0 and isinstance(entry["params"], int)
        assert entry["peak_fraction"] > 0
    assert peaks["float32"]["gflops"] > 0 and peaks["memory"]["scale_gbs"] > 0
    assert results["warp"]["params"] == 0
    assert results["warp"]["bytes"] == 20 * 32 ** 3 and results["warp"]["bound_ms"] > 0
    assert results["student_1"]["work_gflop"] == results["savedmodel_student_1"]["work_gflop"]
    assert results["student_1"]["gflops"] == pytest.approx(
        results["student_1"]["work_gflop"] / (results["student_1"]["median_ms"] / 1e3))
    assert results["student_1"]["params"] == results["savedmodel_student_1"]["params"] \
        == build_student(SIZE, 1).count_params()
    assert "savedmodel_student_1 / student_1" in result.stdout
    paired = written["ratios"]["savedmodel_student_1 / student_1"]
    assert paired["rounds"] == 7 and paired["paired"] > 0 and paired["wall"] > 0
    assert written["ratios"]["student_1 / warp"]["paired"] > 1.0
    batched = results["student_1@b2"]
    assert batched["batch"] == 2 and batched["work_gflop"] == pytest.approx(
        2 * results["student_1"]["work_gflop"])
    assert batched["pairs_per_s"] == pytest.approx(2e3 / batched["median_ms"])
    assert "pairs per second" in result.stdout


def test_bench_refine_rows_and_ratio_pairs():
    bench = load_bench("inference")
    row = bench.parse_row("student_crd_1_bf16+refine25@b2")
    assert (row.model, row.dtype, row.refine, row.batch) == ("student_crd_1", "bfloat16", 25, 2)
    assert bench.parse_row("student_1").refine == 0
    for bad in ("savedmodel_student_1+refine5", "tflite_fp32_student_1+refine5",
                "student_1+refine0", "student_1@b2+refine5", "warp+refine5"):
        with pytest.raises(ValueError, match="unknown row"):
            bench.parse_row(bad)
    names = ["warp", "student_1", "student_crd_1", "student_1_bf16", "student_1+refine10",
             "student_1@b2", "savedmodel_student_1@b2", "savedmodel_student_3",
             "student_1_keras_upconv", "teacher_affine_vtn3"]
    pairs = bench.ratio_pairs(names)
    for pair in [("student_crd_1", "student_1"), ("student_crd_1", "warp"),
                 ("student_1", "warp"), ("teacher_affine_vtn3", "student_crd_1"),
                 ("teacher_affine_vtn3", "student_1"), ("student_1_bf16", "student_1"),
                 ("student_1+refine10", "student_1"), ("student_1_keras_upconv", "student_1"),
                 ("savedmodel_student_1@b2", "student_1@b2")]:
        assert pair in pairs, pair
    assert not [pair for pair in pairs if "savedmodel_student_3" in pair]   # no student_3
    assert len(pairs) == len(set(pairs)) == 9


def test_bench_paired_ratios_alternate_the_two_rows(monkeypatch):
    """Each round times both rows once, in alternating order; the ratio is the median of
    the per-round ratios (so one slow round does not move it)."""
    bench = load_bench("inference_measure")
    order, clock = [], {"a": iter([2.0, 2.0, 9.0, 2.0, 2.0, 2.0]),
                        "b": iter([1.0, 1.0, 1.0, 1.0, 1.0, 1.0])}

    def call(name):
        def run():
            order.append(name)
        run.name = name
        return run
    calls = {"a": call("a"), "b": call("b")}

    def fake_timed(run, repeats):
        assert repeats == 1
        run()
        seconds = next(clock[run.name])
        return [seconds], [2 * seconds]
    monkeypatch.setattr(bench, "repeat_timed", fake_timed)
    paired = bench.paired_ratios([("a", "b"), ("a", "missing")], calls, rounds=5)
    assert order == ["a", "b", "a", "b", "b", "a", "a", "b", "b", "a", "a", "b"]
    assert paired == {"a / b": {"paired": 2.0, "paired_cpu": 2.0, "rounds": 5}}


def test_bench_refinement_summary_and_ratio_table():
    bench = load_bench("inference")
    common = {"params": 1, "min_ms": 1.0, "max_ms": 1.0, "load_1min": 0.0, "batch": 1}
    results = {"student_1": {"median_ms": 100.0, "cpu_ms": 150.0, "pairs_per_s": 10.0,
                             **common},
               "student_1+refine10": {"median_ms": 600.0, "cpu_ms": 1150.0,
                                      "pairs_per_s": 1 / 0.6, "refine_steps": 10, **common},
               "student_1+refine50": {"skipped": "x"}}
    assert bench.refinement(results) == {"student_1+refine10": {"steps": 10,
                                                                "ms_per_step": 50.0}}
    listed = bench.ratios(results, {"student_1+refine10 / student_1": {"paired": 5.5}})
    assert listed == [{"label": "student_1+refine10 / student_1", "wall": 6.0,
                       "cpu": pytest.approx(1150 / 150), "paired": 5.5}]
    table = bench.format_table(results)
    assert "10 steps, 50.0 ms per step" in table and "paired" in table


def test_bench_peer_rows_and_summary(monkeypatch, tmp_path):
    bench = load_bench("inference")
    assert bench.parse_row("ants_syn").source == "ants"
    assert bench.parse_row("voxelmorph_1").model == "voxelmorph_1"
    results = {"student_1": {"median_ms": 100.0}, "student_crd_1": {"median_ms": 20.0},
               "voxelmorph_1": {"median_ms": 300.0},
               "ants_syn": {"skipped": "antspyx not installed"}}
    assert bench.peer_summary(results) == {
        "student_crd_1": {"voxelmorph_1": 15.0, "ants_syn": "skipped: antspyx not installed"},
        "student_1": {"voxelmorph_1": 3.0, "ants_syn": "skipped: antspyx not installed"}}
    assert "student_crd_1: 15.0x faster than VoxelMorph, ANTs SyN skipped: antspyx not " \
        "installed" in "\n".join(load_bench("inference_report").format_peers(results))
    monkeypatch.setitem(sys.modules, "ants", None)       # import ants fails: not installed
    out = tmp_path / "out.json"
    assert bench.main(["--peak", "off", "--rows", "ants_syn", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["rows"]["ants_syn"] == {
        "skipped": "antspyx not installed (pip install 'aldk-tf[bench]')"}


def test_bench_throughput_groups_batch_sizes():
    bench = load_bench("inference_report")
    results = {"student_1": {"median_ms": 100.0, "batch": 1, "pairs_per_s": 10.0},
               "student_1@b4": {"median_ms": 200.0, "batch": 4, "pairs_per_s": 20.0},
               "student_crd_1": {"median_ms": 10.0, "batch": 1, "pairs_per_s": 100.0},
               "student_1_bf16@b2": {"skipped": "no bfloat16"}}
    assert bench.throughput(results) == {"student_1": {1: 10.0, 4: 20.0}}


def test_bench_script_rejects_unknown_rows():
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "inference.py"),
                             "--rows", "student_9"], capture_output=True, text=True,
                            timeout=120, cwd=ROOT)
    assert result.returncode == 2 and "unknown row 'student_9'" in result.stderr


def test_bench_script_checks_the_json_path_before_measuring(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "inference.py"),
                             "--rows", "warp", "--json", str(blocker / "out.json")],
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 2 and "--json" in result.stderr.splitlines()[-1]
    assert "median" not in result.stdout


def test_bf16_dice_script(student_run_32, tmp_path, capsys):
    out = tmp_path / "dice.json"
    assert load_bench("bf16_dice").main(["-c", student_run_32, "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert set(results) == {"keras", "float32", "bfloat16"}
    assert results["float32"]["max_abs_flow_diff"] <= FLOAT32_TOLERANCE
    assert results["bfloat16"]["max_abs_flow_diff"] <= BFLOAT16_TOLERANCE
    assert abs(results["float32"]["dice_change"]) < 1e-6
    assert "bfloat16" in capsys.readouterr().out


@pytest.mark.slow
def test_warp_bench_script_compares_every_implementation():
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "warp.py"), "--size", "16",
                             "--repeats", "1"], capture_output=True, text=True, timeout=300,
                            cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    differences = [float(line.split()[-1]) for line in lines
                   if line.startswith("reference:") and "without XLA" not in line]
    assert len(differences) == 2 and max(differences) < 1e-5     # same warp, all forms
    assert sum("speed-up vs" in line for line in lines) == 3
    assert any(line.startswith("spatial.upsample_flow (XLA, library)") for line in lines)
