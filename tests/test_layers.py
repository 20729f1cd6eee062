import numpy as np
import pytest

import keras

from aldk_tf import layers, spatial


@pytest.mark.parametrize("shape, padding", [
    ((2, 8, 8, 8, 3), "same"), ((1, 7, 5, 6, 2), "same"), ((1, 1, 1, 1, 4), "same"),
    ((2, 8, 8, 8, 3), "valid"), ((1, 7, 5, 6, 2), "valid")])
def test_average_pool_matches_keras(rng, shape, padding):
    x = rng.random(shape).astype(np.float32)
    ours = layers.AveragePool3D(3, 2, padding)(x)
    reference = keras.layers.AveragePooling3D(3, strides=2, padding=padding)(x)
    np.testing.assert_allclose(ours, reference, atol=1e-6)


@pytest.mark.parametrize("layer, inputs", [
    (layers.Warp(), "image_flow"), (layers.ComposeFlows(), "flow_flow"),
    (layers.Downsample(2), "image"), (layers.UpsampleFlow(2), "flow"),
    (layers.Scale(3.0), "image"), (layers.AffineFlow((4, 4, 4)), "affine")])
def test_layers_round_trip_config_and_call_the_function(rng, layer, inputs):
    image = rng.random((1, 4, 4, 4, 1)).astype(np.float32)
    flow = rng.normal(0, 1, (1, 4, 4, 4, 3)).astype(np.float32)
    args = {"image_flow": [image, flow], "flow_flow": [flow, flow], "image": image,
            "flow": flow, "affine": [rng.normal(0, .1, (1, 3, 3)).astype(np.float32),
                                     rng.normal(0, 1, (1, 3)).astype(np.float32)]}[inputs]
    clone = type(layer).from_config(layer.get_config())
    np.testing.assert_array_equal(layer(args), clone(args))
    expected = {"image_flow": lambda: spatial.warp(image, flow),
                "flow_flow": lambda: spatial.compose(flow, flow),
                "image": lambda: (spatial.downsample(image, 2)
                                  if isinstance(layer, layers.Downsample) else image * 3.0),
                "flow": lambda: spatial.upsample_flow(flow, 2),
                "affine": lambda: spatial.affine_flow(*args, (4, 4, 4))}[inputs]()
    np.testing.assert_allclose(layer(args), expected, atol=1e-6)
