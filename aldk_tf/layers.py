"""Thin Keras layers over :mod:`aldk_tf.spatial`; each holds no weights and no logic."""

from __future__ import annotations

import keras

from aldk_tf import spatial


@keras.saving.register_keras_serializable(package="aldk_tf")
class Warp(keras.layers.Layer):
    """``Warp()([image, flow])``: trilinear warp with edge clamping."""

    def call(self, inputs):
        image, flow = inputs
        return spatial.warp(image, flow)

    def compute_output_shape(self, input_shape):
        return input_shape[0]


@keras.saving.register_keras_serializable(package="aldk_tf")
class AffineFlow(keras.layers.Layer):
    """``AffineFlow(spatial_shape)([matrix, translation])`` -> dense flow of ``I + matrix``."""

    def __init__(self, spatial_shape, **kwargs):
        super().__init__(**kwargs)
        self.spatial_shape = tuple(int(n) for n in spatial_shape)

    def call(self, inputs):
        matrix, translation = inputs
        return spatial.affine_flow(matrix, translation, self.spatial_shape)

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0], *self.spatial_shape, 3)

    def get_config(self):
        return {**super().get_config(), "spatial_shape": list(self.spatial_shape)}


@keras.saving.register_keras_serializable(package="aldk_tf")
class ComposeFlows(keras.layers.Layer):
    """``ComposeFlows()([aggregate_flow, flow])``: ``aggregate(x + flow(x)) + flow(x)``."""

    def call(self, inputs):
        aggregate_flow, flow = inputs
        return spatial.compose(aggregate_flow, flow)

    def compute_output_shape(self, input_shape):
        return input_shape[1]


@keras.saving.register_keras_serializable(package="aldk_tf")
class ComposeAffine(keras.layers.Layer):
    """``ComposeAffine()([matrix, affine_flow, flow])``: exact ``(I + W) flow + affine``."""

    def call(self, inputs):
        matrix, affine, flow = inputs
        return spatial.compose_affine(matrix, affine, flow)

    def compute_output_shape(self, input_shape):
        return input_shape[2]


@keras.saving.register_keras_serializable(package="aldk_tf")
class Scale(keras.layers.Layer):
    """Multiply by a constant (the flow multiplier of a cascade)."""

    def __init__(self, factor: float, **kwargs):
        super().__init__(**kwargs)
        self.factor = float(factor)

    def call(self, inputs):
        return inputs * self.factor

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}


@keras.saving.register_keras_serializable(package="aldk_tf")
class JacobianDeterminant(keras.layers.Layer):
    """Determinant of the Jacobian of ``x + flow`` (``[B, D, H, W]``)."""

    def call(self, flow):
        return spatial.jacobian_determinant(flow)

    def compute_output_shape(self, input_shape):
        return input_shape[:4]


@keras.saving.register_keras_serializable(package="aldk_tf")
class Downsample(keras.layers.Layer):
    """Block average by an integer factor (cell-centred grids)."""

    def __init__(self, factor: int, **kwargs):
        super().__init__(**kwargs)
        self.factor = int(factor)

    def call(self, volume):
        return spatial.downsample(volume, self.factor)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], *[n // self.factor for n in input_shape[1:4]],
                input_shape[4])

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}


@keras.saving.register_keras_serializable(package="aldk_tf")
class UpsampleFlow(keras.layers.Layer):
    """Trilinear upsampling of a flow by an integer factor, values scaled by it."""

    def __init__(self, factor: int, **kwargs):
        super().__init__(**kwargs)
        self.factor = int(factor)

    def call(self, flow):
        return spatial.upsample_flow(flow, self.factor)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], *[n * self.factor for n in input_shape[1:4]],
                input_shape[4])

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}
