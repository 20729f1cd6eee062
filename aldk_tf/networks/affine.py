"""Affine stems: a strided conv encoder and two heads giving ``W`` (3x3) and ``b`` (3).

One parameterised class serves the VTN teacher's stem (ten convs) and the student's
cheap affine stage (four convs and an average pooling); the release had three copies.
"""

from __future__ import annotations

import keras

from aldk_tf.layers import AffineFlow, AveragePool3D, Scale
from aldk_tf.networks.blocks import RELEASE_INIT, check_image_size, conv, pair_input

# (filters, stride) per 3x3x3 conv.
VTN_AFFINE_ENCODER = ((16, 2), (32, 2), (64, 2), (64, 1), (128, 2), (128, 1), (256, 2),
                      (256, 1), (512, 2), (512, 1))
STUDENT_AFFINE_ENCODER = ((16, 2), (32, 2), (64, 2), (128, 2))

# The teacher's stem starts as the release's (LeCun uniform); the student's keeps Keras'.
# ``W`` is the head's output times MATRIX_GAIN. The head sees every feature of the last
# grid at once (512 x 1 at 64^3), so an Adam step of size lr on each of its weights moves
# an entry of ``W`` by up to lr x (sum of |features|), about 0.5 at lr 1e-3: one such
# step folded the 64^3 teacher (det loss ~4e11). With the gain the step is ten times
# smaller, as the release's at its learning rate of 1e-4; translations (voxels) keep 1.
# Models saved before the gain existed (no ``matrix_gain`` in their config) had gain 1.
MATRIX_GAIN = 0.1
LEGACY_MATRIX_GAIN = 1.0
AFFINE_VARIANTS = {
    "vtn": {"encoder": VTN_AFFINE_ENCODER, "pool": False, "init": RELEASE_INIT},
    "student": {"encoder": STUDENT_AFFINE_ENCODER, "pool": True,
                "init": "glorot_uniform"},
}


@keras.saving.register_keras_serializable(package="aldk_tf")
class AffineStem(keras.Model):
    """Input ``[B, D, H, W, 2]`` -> ``{"matrix": [B,3,3], "translation": [B,3], "flow"}``.

    ``matrix`` is ``W`` in ``A = W + I``; ``flow = W c + b`` on centred voxel coordinates.
    The heads are bias-free 'valid' convs whose kernel covers the whole remaining grid,
    initialised to zero so that training starts from the identity; ``W``'s head output is
    scaled by ``matrix_gain`` (:data:`MATRIX_GAIN`: bounded steps).
    """

    stride = 16

    def __init__(self, image_size=(128, 128, 128), variant="vtn", name="affine_stem",
                 matrix_gain=MATRIX_GAIN, **kwargs):
        if variant not in AFFINE_VARIANTS:
            raise ValueError(
                f"AffineStem: variant must be one of {sorted(AFFINE_VARIANTS)}, "
                f"got {variant!r}")
        image_size = check_image_size("AffineStem", image_size, self.stride)
        spec = AFFINE_VARIANTS[variant]
        inputs = pair_input(image_size, f"{name}_input")
        x = inputs
        for i, (filters, strides) in enumerate(spec["encoder"], start=1):
            x = conv(filters, 3, strides, f"{name}_conv{i}",
                     kernel_initializer=spec["init"])(x)
        if spec["pool"]:
            x = AveragePool3D(3, strides=2, padding="same", name=f"{name}_pool")(x)
        grid = tuple(int(n) for n in x.shape[1:4])
        matrix = keras.layers.Conv3D(9, grid, padding="valid", use_bias=False,
                                     kernel_initializer="zeros", name=f"{name}_W")(x)
        translation = keras.layers.Conv3D(3, grid, padding="valid", use_bias=False,
                                          kernel_initializer="zeros", name=f"{name}_b")(x)
        matrix = Scale(matrix_gain, name=f"{name}_W_gain")(matrix)
        matrix = keras.layers.Reshape((3, 3), name=f"{name}_matrix")(matrix)
        translation = keras.layers.Reshape((3,), name=f"{name}_translation")(translation)
        flow = AffineFlow(image_size, name=f"{name}_flow")([matrix, translation])
        super().__init__(inputs=inputs,
                         outputs={"matrix": matrix, "translation": translation, "flow": flow},
                         name=name, **kwargs)
        self.image_size, self.variant = image_size, variant
        self.matrix_gain = float(matrix_gain)

    def get_config(self):
        return {"image_size": list(self.image_size), "variant": self.variant,
                "matrix_gain": self.matrix_gain, "name": self.name}

    @classmethod
    def from_config(cls, config):
        return cls(**{"matrix_gain": LEGACY_MATRIX_GAIN, **config})
