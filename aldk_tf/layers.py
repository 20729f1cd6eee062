"""Thin Keras layers over :mod:`aldk_tf.spatial`; each holds no weights and no logic."""

from __future__ import annotations

import keras
import tensorflow as tf

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


def identity_matrix_like(matrix: tf.Tensor) -> tf.Tensor:
    """``I + matrix`` for a batch of ``[B, 3, 3]`` matrices."""
    return matrix + tf.eye(3, dtype=matrix.dtype)
