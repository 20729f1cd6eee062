"""bench/work.py: the FLOP count of a graph from its layer shapes, against a hand
computation, TensorFlow's profiler and the traced graph's transposed convolutions."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from aldk_tf.deploy.inference import registration_function
from aldk_tf.networks import build_student, build_teacher
from scripts import load_script

work = load_script("bench/work.py")


def tiny_model():
    inputs = keras.Input((8, 8, 8, 2))
    x = keras.layers.Conv3D(4, 3, strides=2, padding="same")(inputs)           # 4^3 x 4
    x = keras.layers.Conv3DTranspose(3, 4, strides=2, padding="same")(x)       # 8^3 x 3
    y = keras.layers.Dense(5)(keras.layers.Flatten()(x))
    return keras.Model(inputs, [x, y])


@pytest.mark.parametrize("subpixel", [False, True])
def test_tiny_model_matches_a_hand_count(subpixel):
    counted = work.count_work(tiny_model(), batch=2, subpixel=subpixel)
    conv = 4 ** 3 * 3 ** 3 * 2 * 4                # output voxels x taps x c_in x c_out
    transposed = 4 ** 3 * 4 ** 3 * 4 * 3         # input voxels x taps x c_in x c_out
    subpixel_form = 5 ** 3 * 2 ** 3 * 4 * (8 * 3)  # padded input, kernel 2, 8 phases
    dense = 8 ** 3 * 3 * 5
    assert counted["Conv3D"] == 2 * 2 * conv
    assert counted["Dense"] == 2 * 2 * dense
    if subpixel:
        assert (counted["Conv3DTranspose"], counted["Conv3D (sub-pixel)"]) == \
            (0, 2 * 2 * subpixel_form)
    else:
        assert (counted["Conv3DTranspose"], counted["Conv3D (sub-pixel)"]) == \
            (2 * 2 * transposed, 0)
    assert counted["total"] == sum(v for k, v in counted.items() if k != "total")


def graph_counts(function) -> tuple[int, int]:
    """(Conv3D float ops by tf.profiler, Conv3DBackpropInputV2 FLOP from the graph's
    static shapes) of a traced registration function."""
    graph = function.get_concrete_function().graph
    builder = tf.compat.v1.profiler.ProfileOptionBuilder
    options = builder(builder.float_operation()).with_empty_output().build()
    options["account_type_regexes"] = ["Conv3D"]       # profiler counts Conv3D, not
    conv = tf.compat.v1.profiler.profile(graph, options=options).total_float_ops  # its grads
    transposed = 0
    for op in graph.get_operations():
        if op.type == "Conv3DBackpropInputV2":          # (input_sizes, filter, out_backprop)
            kernel = op.inputs[1].shape.as_list()        # [k, k, k, c_out, c_in]
            transposed += 2 * int(np.prod(op.inputs[2].shape.as_list())) * \
                int(np.prod(kernel[:3])) * kernel[3]
    return conv, transposed


@pytest.mark.parametrize("subpixel, build", [
    (True, lambda: build_student((16, 16, 16), 2, rep=2)),   # four cascade-net calls
    (False, lambda: build_student((16, 16, 16), 2, rep=2)),
    (True, lambda: build_teacher((16, 16, 16), 1, base="voxelmorph"))])  # the peer row
def test_count_matches_the_traced_graph(subpixel, build):
    keras.utils.set_random_seed(0)
    model = build()
    register = registration_function(model, batch=1, subpixel=subpixel)
    counted = work.count_work(register.graph, subpixel=subpixel)
    conv, transposed = graph_counts(register)
    assert counted["Conv3D"] + counted["Conv3D (sub-pixel)"] == conv
    assert counted["Conv3DTranspose"] == transposed
    assert (counted["Conv3D (sub-pixel)"] > 0) == (subpixel and model.base == "student")


def test_memory_bytes_count_each_warp_and_composition_of_a_graph():
    from aldk_tf import layers as spatial_layers
    image = keras.Input((8, 8, 8, 2))
    flow = keras.Input((8, 8, 8, 3))
    warped = spatial_layers.Warp()([image, flow])                     # 8^3 x (2 + 3 + 2)
    composed = spatial_layers.ComposeFlows()([flow, flow])            # 8^3 x (3 + 3 + 3 + 3)
    model = keras.Model([image, flow], [warped, composed])
    assert work.count_memory_bytes(model, batch=3) == 3 * 8 ** 3 * 4 * (7 + 12)
    # A student: its affine flow, the warp of the moving image into the cascade, the
    # composition with the affine flow, the final warp; all on the 32^3 grid.
    student = build_student((32, 32, 32))
    assert work.count_memory_bytes(student) == 32 ** 3 * 4 * (3 + 5 + 9 + 5)
