"""aldk_tf/deploy/serving.py and export.py: SavedModel signatures, TFLite, TF Serving contract."""

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from aldk_tf import metrics, reports

from aldk_tf.training import runs

from aldk_tf.deploy import export, serving
from aldk_tf.data import list_pairs, load_dataset_config, load_pair
from scripts import load_cli

ROOT = Path(__file__).resolve().parents[1]


def run_cli(name, args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = load_cli(name).main(args)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def exported(student_run_32, tmp_path_factory):
    """``export.py`` run once: (version directory, printed output)."""
    base = tmp_path_factory.mktemp("export") / "aldk"
    code, out, err = run_cli("export", ["-c", student_run_32, "--out", str(base)])
    assert code == 0, err
    return base / "1", out


@pytest.fixture(scope="module")
def demo_pair(demo_dataset_32):
    dataset = load_dataset_config(demo_dataset_32)
    fixed_id, moving_id = list_pairs(dataset, "test")[0]       # not the parity input
    pair = load_pair(dataset, fixed_id, moving_id)
    return {key: value[None] for key, value in pair.items() if not key.endswith("_id")}


@pytest.fixture(scope="module")
def keras_outputs(student_run_32, demo_pair):
    _, model = runs.load_model(student_run_32)
    outputs = model({"fixed": demo_pair["fixed"], "moving": demo_pair["moving"]})
    return {key: outputs[key].numpy() for key in ("flow", "warped")}


def test_export_layout_and_printed_parity(exported):
    version, out = exported
    names = sorted(os.listdir(version))
    assert {"saved_model.pb", "variables", "tflite", serving.INFO_NAME} <= set(names)
    assert sorted(os.listdir(version / "tflite")) == [
        "model_fp16.tflite", "model_fp32.tflite", "model_int8.tflite"]
    assert os.listdir(version.parent) == ["1"]                  # no staging left over
    assert oct(os.stat(version).st_mode & 0o777) != oct(0o700)  # readable by a server
    info = json.loads((version / serving.INFO_NAME).read_text())
    assert info["image_size"] == [32, 32, 32] and info["version"] == 1
    assert set(info["parity"]) >= {"savedmodel", "tflite_fp32", "tflite_fp16",
                                   "tflite_int8"}
    assert "Parity against the Keras model" in out and "tflite_int8" in out
    assert (version / "tflite" / "model_fp16.tflite").stat().st_size < \
        0.6 * (version / "tflite" / "model_fp32.tflite").stat().st_size


def test_keras_savedmodel_and_tflite_fp32_give_the_same_flow(exported, demo_pair,
                                                             keras_outputs):
    version, _ = exported
    flow = keras_outputs["flow"]
    assert np.abs(flow).max() > 0.5                             # a real deformation
    fixed, moving = demo_pair["fixed"], demo_pair["moving"]
    saved = serving.savedmodel_runner(str(version))(fixed, moving)
    lite = serving.tflite_runner(version / "tflite" / "model_fp32.tflite")(fixed, moving)
    np.testing.assert_allclose(saved["flow"], flow, atol=1e-4, rtol=0)
    np.testing.assert_allclose(lite["flow"], flow, atol=1e-4, rtol=0)
    np.testing.assert_allclose(lite["warped"], keras_outputs["warped"], atol=1e-4, rtol=0)
    for variant in ("fp16", "int8"):                            # reported, loosely bound
        other = serving.tflite_runner(version / "tflite" / f"model_{variant}.tflite")(
            fixed, moving)
        assert np.abs(other["flow"] - flow).max() < 0.1, variant


def test_tflite_uses_builtin_ops_only(exported):
    version, _ = exported
    for variant in serving.TFLITE_VARIANTS:
        ops = serving.tflite_ops(version / "tflite" / f"model_{variant}.tflite")
        assert "CONV_3D" in ops and "GATHER" in ops
        assert not [op for op in ops if op.startswith("Flex") or op in
                    ("CUSTOM", "DELEGATE", "READ_VARIABLE", "VAR_HANDLE")], ops


def test_saved_model_cli_lists_the_named_signatures(exported):
    version, _ = exported
    cli = shutil.which("saved_model_cli", path=os.path.dirname(sys.executable)) or \
        shutil.which("saved_model_cli")
    assert cli, "saved_model_cli (installed with tensorflow) not found"
    shown = subprocess.run([cli, "show", "--dir", str(version), "--all"],
                           capture_output=True, text=True, timeout=120,
                           env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    serving_block = text.split("signature_def['serving_default']:")[1].split(
        "signature_def[")[0]
    for line in ("inputs['fixed']", "inputs['moving']", "outputs['flow']",
                 "outputs['warped']", "shape: (-1, 32, 32, 32, 1)",
                 "shape: (-1, 32, 32, 32, 3)", "tensorflow/serving/predict"):
        assert line in serving_block, line
    assert "signature_def['warp_segmentation']:" in text
    assert "outputs['warped_segmentation']" in text


def test_tf_serving_predict_request_runs_against_the_signature(exported, demo_pair,
                                                               keras_outputs):
    from tensorflow_serving.apis import predict_pb2

    version, _ = exported
    # Client: a PredictRequest as a gRPC client would send it.
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "aldk"
    request.model_spec.signature_name = "serving_default"
    for name in ("fixed", "moving"):
        request.inputs[name].CopyFrom(tf.make_tensor_proto(demo_pair[name]))
    wire = request.SerializeToString()

    # Server: parse, look the signature up, convert tensors as the model server does.
    received = predict_pb2.PredictRequest.FromString(wire)
    signature = tf.saved_model.load(str(version)).signatures[
        received.model_spec.signature_name]
    _, expected_inputs = signature.structured_input_signature
    assert set(received.inputs) == set(expected_inputs) == {"fixed", "moving"}
    tensors = {name: tf.constant(tf.make_ndarray(proto))
               for name, proto in received.inputs.items()}
    for name, tensor in tensors.items():
        assert expected_inputs[name].is_compatible_with(tensor)
    outputs = signature(**tensors)
    response = predict_pb2.PredictResponse()
    response.model_spec.CopyFrom(received.model_spec)
    for name, value in outputs.items():
        response.outputs[name].CopyFrom(tf.make_tensor_proto(value.numpy()))

    # Client: decode the response.
    answer = predict_pb2.PredictResponse.FromString(response.SerializeToString())
    assert set(answer.outputs) == {"flow", "warped"}
    flow = tf.make_ndarray(answer.outputs["flow"])
    assert flow.shape == (1, 32, 32, 32, 3)
    np.testing.assert_allclose(flow, keras_outputs["flow"], atol=1e-4, rtol=0)


def test_warp_segmentation_signature_matches_the_evaluation_warp(exported, demo_pair,
                                                                 keras_outputs):
    version, _ = exported
    signature = tf.saved_model.load(str(version)).signatures[serving.WARP_SIGNATURE]
    segmentation = demo_pair["moving_seg"]
    warped = signature(segmentation=tf.constant(segmentation),
                       flow=tf.constant(keras_outputs["flow"]))["warped_segmentation"]
    warped = warped.numpy()
    labels = [1, 2, 3]
    expected = metrics.warp_segmentation(segmentation, keras_outputs["flow"], labels)
    np.testing.assert_array_equal(metrics.segmentation_masks(warped, labels), expected)
    assert not np.array_equal(warped, segmentation)           # it did move labels
    assert set(np.unique(warped)) <= {0.0, 1.0, 2.0, 3.0}


def test_evaluation_and_savedmodel_warp_labels_identically(tmp_path, rng):
    """The SavedModel's warp_segmentation and metrics.warp_segmentation are one function
    (spatial.warp_labels): identical masks, for listed labels and for a 0/255 mask."""
    import keras

    fixed = keras.Input((16, 16, 16, 1), name="fixed")
    moving = keras.Input((16, 16, 16, 1), name="moving")
    flow = keras.layers.Conv3D(3, 3, padding="same")(
        keras.layers.Concatenate()([fixed, moving]))
    model = keras.Model({"fixed": fixed, "moving": moving}, {"flow": flow, "warped": moving})
    serving.save_savedmodel(model, str(tmp_path / "model"))
    signature = tf.saved_model.load(str(tmp_path / "model")).signatures[
        serving.WARP_SIGNATURE]
    flow = rng.normal(0, 1.5, (2, 16, 16, 16, 3)).astype(np.float32)
    labels = rng.choice([0, 1, 2, 3], (2, 16, 16, 16, 1)).astype(np.float32)
    for segmentation, label_values in [(labels, [1, 2, 3]), ((labels > 1) * 255.0, None)]:
        warped = signature(segmentation=tf.constant(segmentation, tf.float32),
                           flow=tf.constant(flow))["warped_segmentation"].numpy()
        expected = metrics.warp_segmentation(segmentation, flow, label_values)
        np.testing.assert_array_equal(metrics.segmentation_masks(warped, label_values),
                                      expected)
        assert expected.any() and not np.array_equal(warped, segmentation)


def test_next_version_and_savedmodel_only_bfloat16_export(student_run_32, exported,
                                                         demo_pair):
    """A second export is version 2; ``--tflite none`` writes no TFLite; ``--dtype
    bfloat16`` serves bfloat16 convolutions: float32 outputs, close to the float32
    export's flow but not equal to it."""
    version, _ = exported
    base = version.parent
    assert export.next_version(str(base)) == 2
    code, out, err = run_cli("export", ["-c", student_run_32, "--out", str(base),
                                        "--tflite", "none", "--dtype", "bfloat16"])
    assert code == 0, err
    assert sorted(os.listdir(base)) == ["1", "2"]
    assert not (base / "2" / "tflite").exists()
    assert "savedmodel" in out and "bfloat16 convolutions" in out
    assert json.loads((base / "2" / serving.INFO_NAME).read_text())["dtype"] == "bfloat16"
    flows = [serving.savedmodel_runner(str(base / name))(demo_pair["fixed"],
                                                         demo_pair["moving"])["flow"]
             for name in ("1", "2")]
    assert flows[1].dtype == np.float32
    difference = np.abs(flows[1] - flows[0]).max()
    assert 0.0 < difference <= export.BFLOAT16_TOLERANCE


def write_resized_config(demo_dataset_32, tmp_path):
    data = json.loads(Path(demo_dataset_32).read_text())
    data["image_size"] = [64, 64, 64]
    data["files"]["demo"]["path"] = str(Path(demo_dataset_32).parent / "demo.h5")
    path = tmp_path / "demo64.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize("case, expected", [
    ("existing_version", "already exists"),
    ("unknown_variant", "unknown variant(s) fp8"),
    ("no_config", "no config.json"),
    ("size_mismatch", "size mismatch"),
    ("not_writable", "not writable"),
])
def test_export_errors_are_one_line_and_write_nothing(case, expected, student_run_32,
                                                      demo_dataset_32, exported,
                                                      tmp_path):
    version, _ = exported
    base = tmp_path / "export" / "aldk"
    args = ["-c", student_run_32, "--out", str(base), "--tflite", "none"]
    if case == "existing_version":
        base = version.parent
        args[3] = str(base)
        args += ["--version", "1"]
    elif case == "unknown_variant":
        args[5] = "fp16,fp8"
    elif case == "no_config":
        empty = tmp_path / "weights" / "empty"
        empty.mkdir(parents=True)
        args[1] = str(empty)
    elif case == "size_mismatch":
        args += ["-d", write_resized_config(demo_dataset_32, tmp_path)]
    elif case == "not_writable":
        blocker = tmp_path / "file"
        blocker.write_text("")
        base = blocker / "aldk"
        args[3] = str(base)
    before = sorted(os.listdir(base)) if base.is_dir() else None
    code, out, err = run_cli("export", args)
    lines = err.strip().splitlines()
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    after = sorted(os.listdir(base)) if base.is_dir() else None
    assert after == before or after == []


@pytest.mark.parametrize("n_cascades, factor", [(2, 1), (1, 2)])
def test_student_variants_convert_with_parity(rng, n_cascades, factor):
    """Composition of cascades (ComposeFlows: a warp of the flow) and the
    cross-resolution student's in-graph down/upsampling stay builtin-only."""
    from aldk_tf.config import ModelConfig
    model = ModelConfig(image_size=(32, 32, 32), n_cascades=n_cascades,
                        resolution_factor=factor).build()
    model.set_weights([w + rng.normal(0, 0.05, w.shape).astype(w.dtype)
                       for w in model.get_weights()])
    sample = export.synthetic_sample((32, 32, 32))
    reference = model({"fixed": sample["fixed"], "moving": sample["moving"]})["flow"]
    assert np.abs(reference).max() > 0.5
    flatbuffer = serving.convert_tflite(model, "fp32")
    flow = serving.tflite_runner(flatbuffer)(sample["fixed"], sample["moving"])["flow"]
    np.testing.assert_allclose(flow, reference, atol=1e-4, rtol=0)


def test_evaluate_exported_tflite_reproduces_the_keras_dice(exported, student_run_32,
                                                            tmp_path):
    version, _ = exported
    args = ["-c", student_run_32, "-v", "demo-test", "--out", str(tmp_path),
            "--no-progress"]
    assert run_cli("evaluate", args)[0] == 0
    lite = str(version / "tflite" / "model_fp32.tflite")
    code, _, err = run_cli("evaluate", [*args, "--exported", lite])
    assert code == 0, err
    keras_dice = reports.read_rcn_summary(tmp_path / "student32-demo-test.txt")
    lite_dice = reports.read_rcn_summary(tmp_path /
                                            "student32-model_fp32-demo-test.txt")
    assert lite_dice["Dice score"][0] == pytest.approx(keras_dice["Dice score"][0],
                                                       abs=1e-6)
    document = json.loads((tmp_path / "student32-model_fp32-demo-test.json").read_text())
    assert document["exported"] == lite
    code, _, err = run_cli("evaluate", [*args, "--exported", str(tmp_path)])
    assert code == 2 and "--exported needs" in err


def test_savedmodel_serves_the_fast_inference_graph(exported):
    """The SavedModel runs the graph bench/inference.py times: no transposed convolution
    to few channels (sub-pixel flow heads), no gathers outside XLA, no graph loops."""
    from aldk_tf.deploy.inference import graph_ops, slow_ops
    version, _ = exported
    info = json.loads((version / serving.INFO_NAME).read_text())
    assert info["subpixel_flow_heads"] is True and info["xla"] is True
    signature = tf.saved_model.load(str(version)).signatures["serving_default"]
    assert slow_ops(signature) == {}
    ops = graph_ops(signature)
    assert ops["graph"]["Conv3D"] + ops["xla"]["Conv3D"] > 0    # the walk sees the convs


def test_portable_savedmodel_has_no_xla_must_compile_functions(exported, tmp_path):
    """The default export keeps the XLA-compiled warp (fast); the portable one, for TF
    Serving without --xla_cpu_compilation_enabled, has no XLA marks left."""
    version, _ = exported
    assert b"_XlaMustCompile" in (version / "saved_model.pb").read_bytes()

    module = tf.Module()
    module.double = tf.function(lambda x: 2.0 * x + 1.0, jit_compile=True,
                                input_signature=[tf.TensorSpec([None], tf.float32)])
    path = str(tmp_path / "xla")
    tf.saved_model.save(module, path, signatures={"serving_default": module.double})
    assert b"_XlaMustCompile" in (tmp_path / "xla" / "saved_model.pb").read_bytes()
    assert serving.strip_xla_must_compile(path) >= 1
    assert b"_XlaMustCompile" not in (tmp_path / "xla" / "saved_model.pb").read_bytes()
    tf.saved_model.experimental.read_fingerprint(path)          # still consistent
    signature = tf.saved_model.load(path).signatures["serving_default"]
    result = list(signature(x=tf.constant([1.0, 2.0])).values())[0]
    np.testing.assert_allclose(result, [3.0, 5.0])


def test_warmup_requests_read_back_as_prediction_logs(exported):
    """TF Serving's warm-up file: PredictionLog records that the SavedModel answers."""
    from tensorflow_serving.apis import prediction_log_pb2

    version, _ = exported
    path = version / export.WARMUP_PATH
    assert path.is_file()
    logs = [prediction_log_pb2.PredictionLog.FromString(record.numpy())
            for record in tf.data.TFRecordDataset(str(path))]
    requests = [log.predict_log.request for log in logs]
    assert [r.model_spec.signature_name for r in requests] == [serving.SERVING_SIGNATURE,
                                                               serving.WARP_SIGNATURE]
    assert {r.model_spec.name for r in requests} == {"aldk"}    # the model base name
    loaded = tf.saved_model.load(str(version))
    for request in requests:
        signature = loaded.signatures[request.model_spec.signature_name]
        _, expected = signature.structured_input_signature
        tensors = {name: tf.constant(tf.make_ndarray(proto))
                   for name, proto in request.inputs.items()}
        assert set(tensors) == set(expected)
        assert all(expected[name].is_compatible_with(t) for name, t in tensors.items())
        outputs = signature(**tensors)
        assert all(np.isfinite(value.numpy()).all() for value in outputs.values())
    info = json.loads((version / serving.INFO_NAME).read_text())
    assert info["warmup_requests"] == export.WARMUP_PATH


def test_warmup_requests_are_skipped_with_a_note_without_serving_api(tmp_path,
                                                                     monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_serving.apis", None)   # ImportError
    sample = export.synthetic_sample((8, 8, 8))
    note = export.write_warmup_requests(str(tmp_path), sample, "m")
    assert note.startswith("skipped: tensorflow-serving-api is not installed")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("warmup", [True, False])
def test_export_writes_warmup_requests_only_when_asked(tmp_path, warmup):
    from aldk_tf.networks import build_student
    exported = export.export_model(build_student((16, 16, 16)), str(tmp_path / "m"),
                                   tflite=(), portable=True, warmup=warmup)
    version = Path(exported["path"])
    assert (version / export.WARMUP_PATH).is_file() == warmup
    assert (version / "assets.extra").exists() == warmup
    info = json.loads((version / serving.INFO_NAME).read_text())
    assert info["warmup_requests"] == (export.WARMUP_PATH if warmup else None)
