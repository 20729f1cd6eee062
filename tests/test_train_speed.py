"""Faster training steps that must not change training: the fast layer forms in training
(same loss and gradients), mixed bfloat16 training (layers' dtypes, the loss curve), and
bench/train_step.py's profile reader."""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.tsl.profiler.protobuf import xplane_pb2

from aldk_tf.config import LossWeights, ModelConfig, RunConfig, TrainConfig
from aldk_tf.data import synth
from aldk_tf.data.synth import GeneratorSettings
from aldk_tf.deploy.inference import use_fast_layers
from aldk_tf.training.run import build_trainer
from aldk_tf.training.trainer import network_inputs
from scripts import load_script
from test_data_synth import ball_template

train_step = load_script("bench/train_step.py")
SIZE = 16


@pytest.fixture(scope="module")
def batches():
    stream = synth.pair_stream(ball_template(SIZE), GeneratorSettings(), 2, seed=1)
    return [batch for batch, _ in zip(stream, range(4))]


def config(precision="float32", steps=200) -> RunConfig:
    return RunConfig(model=ModelConfig(image_size=(SIZE,) * 3),
                     losses=LossWeights(label=1.0),
                     train=TrainConfig(batch=2, round=steps, epochs=1, lr=1e-3,
                                       schedule="constant", clip_norm=1.0,
                                       generator=GeneratorSettings().to_dict(),
                                       precision=precision))


def loss_and_gradients(network, batch):
    with tf.GradientTape() as tape:
        outputs = network(network_inputs(batch), training=True)
        loss = (tf.reduce_mean((outputs["warped"] - batch["fixed"]) ** 2)
                + tf.reduce_mean(outputs["flow"] ** 2))
    return loss, tape.gradient(loss, network.trainable_variables)


@pytest.mark.parametrize("role", ["student", "teacher"])
def test_fast_layers_give_the_same_loss_and_gradients(role, batches):
    keras.utils.set_random_seed(0)
    model = (ModelConfig(image_size=(32,) * 3) if role == "student" else
             ModelConfig(role="teacher", base="vtn", affine="vtn", image_size=(32,) * 3))
    network = model.build()
    for variable in network.trainable_variables:   # weights far from the near-zero heads
        variable.assign(tf.random.normal(variable.shape, stddev=0.05, seed=1))
    stream = synth.pair_stream(ball_template(32), GeneratorSettings(), 1, seed=2)
    batch = next(iter(stream))
    loss, gradients = loss_and_gradients(network, batch)
    changed = sum(layer.call.__func__ is not type(layer).call
                  for layer in _layers(use_fast_layers(network)))
    assert changed >= 2                               # a flow head and an image pair
    fast_loss, fast_gradients = loss_and_gradients(network, batch)
    np.testing.assert_allclose(fast_loss.numpy(), loss.numpy(), rtol=1e-5)
    for slow, fast in zip(gradients, fast_gradients):
        scale = float(tf.reduce_max(tf.abs(slow))) + 1e-12
        assert float(tf.reduce_max(tf.abs(slow - fast))) <= 1e-4 * scale


def _layers(model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _layers(layer)


def test_bfloat16_training_computes_features_in_bfloat16_and_geometry_in_float32(batches):
    keras.utils.set_random_seed(0)
    parts = build_trainer(config("bfloat16"))
    compute = {layer.name: layer.compute_dtype for layer in _layers(parts.network)}
    convolutions = {layer.name: layer for layer in _layers(parts.network)
                    if isinstance(layer, keras.layers.Conv3D)}
    # At 16^3 the deepest convolutions see fewer voxels than their kernel: float32 (the
    # bfloat16 weight gradient of those is wrong, aldk_tf.deploy.inference).
    small = {name for name, layer in convolutions.items()
             if not isinstance(layer, keras.layers.Conv3DTranspose)
             and min(layer.input.shape[1:4]) < layer.kernel_size[0]}
    assert small and all(compute[name] == "float32" for name in small)
    others = set(convolutions) - small
    assert len(others) >= 4
    assert sum(compute[name] == "bfloat16" for name in others) >= len(others) - 2
    assert all(variable.dtype == "float32" for variable in parts.network.variables)
    outputs = parts.network(network_inputs(batches[0]))
    assert outputs["flow"].dtype == tf.float32 and outputs["warped"].dtype == tf.float32
    with pytest.raises(ValueError, match="train.precision"):
        build_trainer(dataclasses.replace(config(), train=TrainConfig(precision="fp16")))


def loss_curve(precision: str, batches, steps: int) -> np.ndarray:
    keras.utils.set_random_seed(0)
    parts = build_trainer(config(precision, steps))
    losses = [float(parts.trainer.train_on_batch(batches[step % len(batches)],
                                                 return_dict=True)["loss"])
              for step in range(steps)]
    return np.array(losses)


def test_bfloat16_follows_the_float32_loss_curve_over_200_steps(batches):
    """Same seed, same batches: the curves fall alike (a bfloat16 step is not the same
    step, so the comparison is of the curves' course, to within the steps' noise)."""
    float32 = loss_curve("float32", batches, 200)
    bfloat16 = loss_curve("bfloat16", batches, 200)
    assert np.all(np.isfinite(bfloat16))
    start, end = slice(0, 20), slice(-50, None)
    drop32 = float32[start].mean() - float32[end].mean()
    drop16 = bfloat16[start].mean() - bfloat16[end].mean()
    assert drop32 > 0.05                              # the float32 run does learn
    noise = float32[end].std() + bfloat16[end].std()
    assert abs(bfloat16[end].mean() - float32[end].mean()) <= max(noise, 0.1 * drop32)
    assert drop16 >= 0.8 * drop32


def xspace(events) -> xplane_pb2.XSpace:
    """A host plane with one line of ``(name, start_ps, duration_ps)`` events."""
    space = xplane_pb2.XSpace()
    plane = space.planes.add(name="/host:CPU")
    line = plane.lines.add(name="tf_Compute")
    ids = {}
    for name, start, duration in events:
        if name not in ids:
            ids[name] = len(ids) + 1
            plane.event_metadata[ids[name]].id = ids[name]
            plane.event_metadata[ids[name]].name = name
        line.events.add(metadata_id=ids[name], offset_ps=start, duration_ps=duration)
    return space


def test_profile_reader_counts_self_time_per_op_type():
    ms = 10 ** 9                                                  # picoseconds
    space = xspace([("ExecutorState::Process", 0, 100 * ms),       # framework: left out
                    ("EagerLocalExecute: __inference_step_1", 0, 100 * ms),
                    ("model/conv/Conv3D:_MklNativeConv3D", 0, 10 * ms),
                    ("model/loss/mul:Mul", 10 * ms, 6 * ms),
                    ("model/loss/inner:Mul", 11 * ms, 2 * ms),        # nested in the Mul
                    ("CpuExecutable::ExecuteAsyncOnStream", 20 * ms, 5 * ms),
                    ("model/conv2/Conv3D:_MklNativeConv3D", 30 * ms, 1 * ms)])
    totals = train_step.op_self_times(space)
    assert totals == pytest.approx({"_MklNativeConv3D": 11.0, "Mul": 6.0,
                                    train_step.op_kind(train_step.XLA_RUN): 5.0})


def test_precision_auto_is_bfloat16_only_where_the_cpu_has_native_bfloat16():
    from aldk_tf.deploy.cpu import training_precision
    with_bf16 = "processor\t: 0\nflags\t\t: fpu sse2 avx512f avx512_bf16\n"
    without = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n"
    assert training_precision("auto", with_bf16) == "bfloat16"
    assert training_precision("auto", without) == "float32"
    assert training_precision("float32", with_bf16) == "float32"
    assert training_precision("bfloat16", without) == "bfloat16"


def test_compare_with_pairs_each_row_with_its_earlier_float32_row():
    before = {"rows": [{"row": "student", "size": 64, "batch": 2, "ms_per_step": 180.0}],
              "command": "before", "label": "before", "peak": {}}
    after = {"rows": [{"row": "student", "size": 64, "batch": 2, "ms_per_step": 150.0},
                      {"row": "student_bf16", "size": 64, "batch": 2, "ms_per_step": 120.0},
                      {"row": "student", "size": 64, "batch": 1, "ms_per_step": 80.0}]}
    rows = train_step.compare_with(after, before)["rows"]
    assert [row.get("speed_up") for row in rows] == [pytest.approx(1.2), pytest.approx(1.5),
                                                     None]
    assert rows[1]["before_ms"] == 180.0 and after["before"]["command"] == "before"
