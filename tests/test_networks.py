import numpy as np
import pytest

import keras
import tensorflow as tf

from aldk_tf.networks.critic import FlowCritic
from aldk_tf.networks import (AffineStem, RecursiveCascade, StudentNet, VoxelMorphNet,
                              VTNNet, build_student, build_teacher)

SIZE = (16, 16, 16)


def pair(rng, batch=1, size=SIZE):
    return {"fixed": rng.random((batch, *size, 1)).astype(np.float32),
            "moving": rng.random((batch, *size, 1)).astype(np.float32)}


def test_parameter_counts_at_128():
    """The counts the README quotes: VTN subnetwork ~28 M, paper student <= 1.6 M."""
    size = (128, 128, 128)
    assert abs(VTNNet(size).count_params() - 28.25e6) < 0.1e6
    assert StudentNet(size).count_params() <= 1.6e6
    assert StudentNet(size).count_params() * 10 < VTNNet(size).count_params() * 0.6


@pytest.mark.parametrize("network", [
    lambda: VTNNet(SIZE), lambda: VoxelMorphNet(SIZE), lambda: StudentNet(SIZE),
    lambda: StudentNet(SIZE, variant="release"), lambda: FlowCritic(SIZE),
    lambda: AffineStem(SIZE), lambda: AffineStem(SIZE, variant="student")])
def test_config_round_trip_gives_identical_outputs(rng, network):
    model = network()
    clone = type(model).from_config(model.get_config())
    clone.set_weights(model.get_weights())
    channels = model.input.shape[-1]
    x = rng.random((2, *SIZE, channels)).astype(np.float32)
    out, out_clone = model(x), clone(x)
    if isinstance(out, dict):
        for key in out:
            np.testing.assert_array_equal(out[key], out_clone[key])
    else:
        np.testing.assert_array_equal(out, out_clone)


@pytest.mark.parametrize("build", [
    lambda: build_teacher(SIZE, n_cascades=2),
    lambda: build_student(SIZE, n_cascades=3),
    lambda: RecursiveCascade(SIZE, base="voxelmorph", n_cascades=1, affine=None)])
def test_cascade_save_and_load(tmp_path, rng, build):
    model = build()
    # Move weights away from the zero-initialised affine heads so the test can fail.
    model.set_weights([w + rng.normal(0, 1e-3, w.shape).astype(w.dtype)
                       for w in model.get_weights()])
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    inputs = pair(rng, batch=2)
    out, out_loaded = model(inputs), loaded(inputs)
    assert set(out) == set(out_loaded)
    for key in out:
        np.testing.assert_allclose(out[key], out_loaded[key], atol=1e-6)


@pytest.mark.parametrize("n_cascades", [1, 2, 3])
@pytest.mark.parametrize("batch", [1, 2])
def test_student_cascade_shapes(rng, n_cascades, batch):
    model = build_student(SIZE, n_cascades=n_cascades)
    out = model(pair(rng, batch))
    assert out["flow"].shape == (batch, *SIZE, 3)
    assert out["warped"].shape == (batch, *SIZE, 1)
    assert out["matrix"].shape == (batch, 3, 3)
    assert model.deformable_flow_keys() == [f"cascade_flow_{k}"
                                            for k in range(1, n_cascades + 1)]


def test_teacher_at_32_and_non_cubic(rng):
    model = build_teacher((32, 16, 48), n_cascades=1)
    out = model(pair(rng, size=(32, 16, 48)))
    assert out["flow"].shape == (1, 32, 16, 48, 3)


def test_aggregate_flow_is_the_composition(rng):
    """The final flow equals composing the affine flow with each cascade's own flow."""
    from aldk_tf import spatial
    model = build_student(SIZE, n_cascades=2)
    model.set_weights([w + rng.normal(0, 2e-3, w.shape).astype(w.dtype)
                       for w in model.get_weights()])
    inputs = pair(rng)
    out = model(inputs)
    aggregate = spatial.compose_affine(out["matrix"], out["affine_flow"],
                                       out["cascade_flow_1"])
    aggregate = spatial.compose(aggregate, out["cascade_flow_2"])
    np.testing.assert_allclose(out["flow"], aggregate, atol=1e-5)
    np.testing.assert_allclose(out["warped"], spatial.warp(inputs["moving"], aggregate),
                               atol=1e-5)


def test_shared_weight_repetition(rng):
    model = build_student(SIZE, n_cascades=1)
    repeated = model.with_rep(3)
    assert repeated.count_params() == model.count_params()
    out = repeated(pair(rng))
    assert {"cascade_flow_3", "warped_3"} <= set(out)
    assert "cascade_flow_4" not in out


def test_registration_model_outputs_flow_and_warped(rng):
    model = build_student(SIZE)
    inference = model.registration_model()
    inputs = pair(rng)
    out = inference(inputs)
    assert set(out) == {"flow", "warped"}
    np.testing.assert_array_equal(out["flow"], model(inputs)["flow"])


def test_parameter_report_sums_to_total():
    report = build_teacher(SIZE, n_cascades=2).parameter_report()
    assert set(report) == {"affine_stem", "cascade_1", "cascade_2", "total"}
    assert sum(v for k, v in report.items() if k != "total") == report["total"]


@pytest.mark.parametrize("bad", [(15, 16, 16), (16, 16), (8, 8, 8)])
def test_bad_image_size_is_rejected(bad):
    with pytest.raises(ValueError, match="divisible by 16"):
        StudentNet(bad)


def test_bad_base_is_rejected():
    with pytest.raises(ValueError, match="base must be one of"):
        RecursiveCascade(SIZE, base="unet")


def test_cross_resolution_student(rng):
    from aldk_tf import spatial
    model = build_student((32, 32, 32), n_cascades=2, resolution_factor=2)
    model.set_weights([w + rng.normal(0, 2e-3, w.shape).astype(w.dtype)
                       for w in model.get_weights()])
    inputs = pair(rng, size=(32, 32, 32))
    out = model(inputs)
    assert out["low_flow"].shape == (1, 16, 16, 16, 3)
    assert out["cascade_flow_1"].shape == (1, 16, 16, 16, 3)
    np.testing.assert_allclose(out["flow"], spatial.upsample_flow(out["low_flow"], 2),
                               atol=1e-6)
    np.testing.assert_allclose(out["warped"], spatial.warp(inputs["moving"], out["flow"]),
                               atol=1e-6)
    clone = RecursiveCascade.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    np.testing.assert_array_equal(clone(inputs)["flow"], out["flow"])
    with pytest.raises(ValueError, match="divisible by 16"):
        build_student((16, 16, 16), resolution_factor=2)


def test_critic_output_kinds(rng):
    flows = rng.normal(0, 50, (3, *SIZE, 3)).astype(np.float32)
    sigmoid = FlowCritic(SIZE, output="sigmoid")
    scores = np.asarray(sigmoid(flows))
    assert scores.shape == (3, 1) and np.all((scores > 0) & (scores < 1))
    raw = FlowCritic.from_config({**sigmoid.get_config(), "output": "raw"})
    raw.set_weights(sigmoid.get_weights())
    np.testing.assert_allclose(1 / (1 + np.exp(-np.asarray(raw(flows)))), scores,
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="output must be"):
        FlowCritic(SIZE, output="tanh")


@pytest.mark.parametrize("variant", ["vtn", "student"])
def test_an_adam_step_moves_the_affine_matrix_by_a_tenth_of_lr_per_feature(rng, variant):
    """The matrix head sees every feature of the last grid at once (512 in the VTN stem):
    Adam's first step (lr x sign of each weight's gradient) moves an entry of W by
    gain x lr x sum(|features|). With gain 1 that was ~0.5 at lr 1e-3 for the trained
    64^3 teacher's features, and one such step folded it; the gain is 0.1."""
    stem = AffineStem((32, 32, 32), variant=variant)
    head = stem.get_layer(f"{stem.name}_W")
    features = keras.Model(stem.input, head.input)
    pair = tf.constant(rng.random((1, 32, 32, 32, 2), np.float32))
    optimizer = keras.optimizers.Adam(1e-3, epsilon=1e-15)   # untrained features are tiny
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(stem(pair)["matrix"])
    optimizer.apply_gradients([(tape.gradient(loss, head.kernel), head.kernel)])
    moved = stem(pair)["matrix"].numpy()             # W started at zero
    expected = 0.1 * 1e-3 * np.abs(features(pair).numpy()).sum()
    np.testing.assert_allclose(moved, -expected, rtol=1e-3)


def test_models_saved_before_the_affine_gain_load_with_gain_one(rng):
    """Runs and Keras configs from before the gain have none recorded: they were trained
    with W = head output, so they must load with gain 1, new ones with 0.1."""
    from aldk_tf.config import RunConfig
    old = RunConfig.from_dict({"model": {"image_size": [16, 16, 16]}})
    assert old.model.matrix_gain == 1.0
    assert RunConfig.from_dict(RunConfig().to_dict()).model.matrix_gain == 0.1
    new = build_student(SIZE)
    config = new.get_config()
    del config["matrix_gain"]
    legacy = RecursiveCascade.from_config(config)
    legacy.set_weights(new.get_weights())
    stem = legacy.get_layer("affine_stem")
    head = stem.get_layer("affine_stem_W")
    head.kernel.assign(tf.fill(head.kernel.shape, 0.01))
    new.get_layer("affine_stem").get_layer("affine_stem_W").kernel.assign(head.kernel)
    inputs = pair(rng)
    np.testing.assert_allclose(legacy(inputs)["matrix"], 10 * new(inputs)["matrix"].numpy(),
                               rtol=1e-4, atol=1e-7)


def test_one_table_of_base_networks_serves_the_cascade_and_the_cli():
    from aldk_tf.cli import train as cli
    from aldk_tf.networks.bases import BASES
    for base, spec in BASES.items():
        network = RecursiveCascade(SIZE, base=base, affine=None, channels=8).get_layer(
            "cascade_1")
        assert type(network) is spec.network_class()
        if "channels" in spec.settings:
            assert network.channels == 8
        assert cli.BASES[spec.flag.lower()] == (spec.role, base, spec.affine)
        assert cli.BASE_FLAGS[base] == spec.flag
        assert spec.flag in cli.make_parser().format_help()
    with pytest.raises(ValueError, match=r"one of \('vtn', 'voxelmorph', 'student'\)"):
        RecursiveCascade(SIZE, base="unet")


def test_the_cli_reads_the_table_without_importing_tensorflow():
    import subprocess
    import sys
    code = ("import sys, aldk_tf.cli.train; "
            "sys.exit('tensorflow' in sys.modules or 'keras' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_the_paper_variant_loads_from_configs_that_call_it_seed(rng):
    from aldk_tf.cli import train as cli
    from aldk_tf.config import ModelConfig, RunConfig
    paper = build_student(SIZE)
    config = {**paper.get_config(), "student_variant": "seed"}
    old = RecursiveCascade.from_config(config)
    assert old.get_config() == paper.get_config()
    old.set_weights(paper.get_weights())                # the same layers and shapes
    inputs = pair(rng)
    np.testing.assert_array_equal(old(inputs)["flow"], paper(inputs)["flow"])
    net = StudentNet.from_config({**StudentNet(SIZE).get_config(), "variant": "seed"})
    assert net.variant == "paper"
    stored = RunConfig.from_dict({"model": {"image_size": [16] * 3, "student_variant": "seed"}})
    assert stored.model == ModelConfig(image_size=(16,) * 3, matrix_gain=1.0)
    assert cli.parse_args(["--student-variant", "seed"]).student_variant == "paper"
    assert cli.parse_args([]).student_variant == "paper"
    with pytest.raises(ValueError, match="variant must be one of"):
        StudentNet(SIZE, variant="sead")
