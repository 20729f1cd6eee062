"""VoxelMorph base network as RCN used it (VoxelMorph-2 channel counts)."""

from __future__ import annotations

import keras

from aldk_tf.layers import Scale
from aldk_tf.networks.blocks import check_image_size, conv, pair_input

ENCODER = (16, 32, 32, 32)
DECODER = (32, 32, 32, 32, 32, 16, 16)


@keras.saving.register_keras_serializable(package="aldk_tf")
class VoxelMorphNet(keras.Model):
    """Input ``[B, D, H, W, 2]`` -> flow ``[B, D, H, W, 3]``.

    U-Net: four stride-2 3x3x3 convs (16, 32, 32, 32); the decoder convolves, upsamples
    (nearest) and concatenates the skip at each level back to full resolution, then two
    more convs (32, 16) and a final conv (16) before the 3-channel flow conv, whose
    weights start small (normal, std 1e-5) as in VoxelMorph.
    """

    stride = 16

    def __init__(self, image_size=(128, 128, 128), flow_multiplier=1.0, name="voxelmorph",
                 **kwargs):
        image_size = check_image_size("VoxelMorphNet", image_size, self.stride)
        inputs = pair_input(image_size, f"{name}_input")
        skips, x = [inputs], inputs
        for i, filters in enumerate(ENCODER):
            x = conv(filters, 3, 2, f"{name}_enc{i + 1}")(x)
            skips.append(x)
        for i in range(4):
            x = conv(DECODER[i], 3, 1, f"{name}_dec{i + 1}")(x)
            x = keras.layers.UpSampling3D(2, name=f"{name}_up{i + 1}")(x)
            x = keras.layers.Concatenate(name=f"{name}_concat{i + 1}")([x, skips[-2 - i]])
        x = conv(DECODER[4], 3, 1, f"{name}_dec5")(x)
        x = conv(DECODER[5], 3, 1, f"{name}_dec6")(x)
        x = conv(DECODER[6], 3, 1, f"{name}_dec7")(x)
        flow = keras.layers.Conv3D(
            3, 3, padding="same", name=f"{name}_flow_conv",
            kernel_initializer=keras.initializers.RandomNormal(stddev=1e-5))(x)
        flow = Scale(flow_multiplier, name=f"{name}_flow")(flow)
        super().__init__(inputs=inputs, outputs=flow, name=name, **kwargs)
        self.image_size, self.flow_multiplier = image_size, float(flow_multiplier)

    def get_config(self):
        return {"image_size": list(self.image_size), "flow_multiplier": self.flow_multiplier,
                "name": self.name}

    @classmethod
    def from_config(cls, config):
        return cls(**config)
