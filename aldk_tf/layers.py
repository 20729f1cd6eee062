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


@keras.saving.register_keras_serializable(package="aldk_tf")
class UpsampleFlowAndWarp(keras.layers.Layer):
    """``UpsampleFlowAndWarp(factor)([image, low_flow])`` -> ``[flow, warped]``: the
    cross-resolution model's :class:`UpsampleFlow` and full-resolution :class:`Warp` as
    one XLA loop (inference graphs; no hand-written gradient)."""

    def __init__(self, factor: int, **kwargs):
        super().__init__(**kwargs)
        self.factor = int(factor)

    def call(self, inputs):
        image, low_flow = inputs
        return list(spatial.upsample_flow_and_warp(image, low_flow, self.factor))

    def compute_output_shape(self, input_shape):
        image = input_shape[0]
        return [(*image[:4], 3), tuple(image)]

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}


@keras.saving.register_keras_serializable(package="aldk_tf")
class AveragePool3D(keras.layers.Layer):
    """3-D average pooling built from two 2-D pools (H-W, then D).

    Same numbers as ``AveragePooling3D`` (a box average whose 'same' padding is left out
    of the count factorises per axis), but made of ``AVERAGE_POOL_2D``, which TFLite has
    as a builtin while it has no 3-D pooling.
    """

    def __init__(self, pool_size=3, strides=2, padding="same", **kwargs):
        super().__init__(**kwargs)
        self.pool_size, self.strides = int(pool_size), int(strides)
        self.padding = padding.upper()

    def call(self, inputs):
        _, depth, height, width, channels = inputs.shape
        k, s = self.pool_size, self.strides
        x = tf.reshape(inputs, [-1, height, width, channels])
        x = tf.nn.avg_pool2d(x, (k, k), (s, s), self.padding)
        out_h, out_w = x.shape[1], x.shape[2]
        x = tf.reshape(x, [-1, depth, out_h * out_w, channels])
        x = tf.nn.avg_pool2d(x, (k, 1), (s, 1), self.padding)
        return tf.reshape(x, [-1, x.shape[1], out_h, out_w, channels])

    def compute_output_shape(self, input_shape):
        def out(n):
            if self.padding == "SAME":
                return -(-n // self.strides)
            return (n - self.pool_size) // self.strides + 1
        return (input_shape[0], *[out(n) for n in input_shape[1:4]], input_shape[4])

    def get_config(self):
        return {**super().get_config(), "pool_size": self.pool_size,
                "strides": self.strides, "padding": self.padding.lower()}
