"""The light-weight student network (LDR, the ALDK paper's part 2) and the released-code
variant."""

from __future__ import annotations

import keras

from aldk_tf.layers import Scale
from aldk_tf.networks.bases import STUDENT_VARIANTS, student_variant_name
from aldk_tf.networks.blocks import check_image_size, conv, pair_input, upconv


@keras.saving.register_keras_serializable(package="aldk_tf")
class StudentNet(keras.Model):
    """Input ``[B, D, H, W, 2]`` -> flow ``[B, D, H, W, 3]``.

    ``variant="paper"`` (default), as the paper describes it: four 4x4x4 stride-2 convs
    (16, 32, 64, 128 channels, LeakyReLU), three stride-2 transposed convs back up to
    1/2 with the encoder features concatenated as skips, and a transposed-conv flow head
    to full resolution. About 1.55 M parameters.

    ``variant="release"``: the released code's VoxelMorph-like decoder, with upsampling +
    3x3x3 convs and extra full-resolution 3x3x3 convs before the flow head. Written from
    its description for comparison; it is slower on a CPU (full-resolution convs).

    The flow is multiplied by ``flow_multiplier`` (1 / number of cascades). Configs saved
    with the variant's earlier name ``"seed"`` load as ``"paper"``.
    """

    stride = 16

    def __init__(self, image_size=(128, 128, 128), variant="paper", flow_multiplier=1.0,
                 channels=16, name="student", **kwargs):
        variant = student_variant_name(variant)
        if variant not in STUDENT_VARIANTS:
            raise ValueError(f"StudentNet: variant must be one of {STUDENT_VARIANTS}, "
                             f"got {variant!r}")
        image_size = check_image_size("StudentNet", image_size, self.stride)
        inputs = pair_input(image_size, f"{name}_input")
        skips, x = [], inputs
        for level in range(4):                    # 1/2, 1/4, 1/8, 1/16
            x = conv(channels * 2 ** level, 4, 2, f"{name}_conv{level + 1}")(x)
            skips.append(x)
        if variant == "paper":
            for level in (2, 1, 0):               # up to 1/8, 1/4, 1/2
                x = upconv(channels * 2 ** level, f"{name}_deconv{level + 1}")(x)
                x = keras.layers.Concatenate(name=f"{name}_concat{level + 1}")(
                    [x, skips[level]])
            flow = upconv(3, f"{name}_flow_head", activation=False)(x)
        else:
            for level in (2, 1, 0):
                x = keras.layers.UpSampling3D(2, name=f"{name}_up{level + 1}")(x)
                x = keras.layers.Concatenate(name=f"{name}_concat{level + 1}")(
                    [x, skips[level]])
                x = conv(channels * 2, 3, 1, f"{name}_dec{level + 1}")(x)
            x = keras.layers.UpSampling3D(2, name=f"{name}_up0")(x)
            x = keras.layers.Concatenate(name=f"{name}_concat0")([x, inputs])
            x = conv(channels * 2, 3, 1, f"{name}_full1")(x)
            x = conv(channels, 3, 1, f"{name}_full2")(x)
            x = conv(channels, 3, 1, f"{name}_full3")(x)
            flow = conv(3, 3, 1, f"{name}_flow_head", activation=False)(x)
        flow = Scale(flow_multiplier, name=f"{name}_flow")(flow)
        super().__init__(inputs=inputs, outputs=flow, name=name, **kwargs)
        self.image_size, self.variant = image_size, variant
        self.flow_multiplier, self.channels = float(flow_multiplier), channels

    def get_config(self):
        return {"image_size": list(self.image_size), "variant": self.variant,
                "flow_multiplier": self.flow_multiplier, "channels": self.channels,
                "name": self.name}

    @classmethod
    def from_config(cls, config):
        return cls(**config)
