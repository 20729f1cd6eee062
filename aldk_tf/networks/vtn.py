"""VTN deformable subnetwork (Zhao et al., used as the RCN teacher's base network)."""

from __future__ import annotations

import keras

from aldk_tf.layers import Scale
from aldk_tf.networks.blocks import (RELEASE_INIT, check_image_size, conv, crop_to,
                                     flow_head_init, pair_input, upconv)

# Encoder: (name, channel multiple of c, stride).
VTN_ENCODER = (("conv1", 1, 2), ("conv2", 2, 2), ("conv3", 4, 2), ("conv3_1", 4, 1),
               ("conv4", 8, 2), ("conv4_1", 8, 1), ("conv5", 16, 2), ("conv5_1", 16, 1),
               ("conv6", 32, 2), ("conv6_1", 32, 1))


@keras.saving.register_keras_serializable(package="aldk_tf")
class VTNNet(keras.Model):
    """Input ``[B, D, H, W, 2]`` (fixed, moving) -> flow ``[B, D, H, W, 3]``.

    Ten 3x3x3 convs (six of stride 2) down to 1/64; from the bottom up, every level
    predicts a 3-channel flow, upsamples it (no bias) and the features, and concatenates
    them with the skip. The last transposed conv goes straight to 3 channels at full
    resolution; the output is multiplied by ``20 * flow_multiplier``.

    Convs start LeCun-uniform as in the release; the flow predictions start near zero
    (:func:`flow_head_init`), so the first flow is the identity, not noise times 20.
    """

    stride = 16

    def __init__(self, image_size=(128, 128, 128), channels=16, flow_multiplier=1.0,
                 name="vtn", **kwargs):
        image_size = check_image_size("VTNNet", image_size, self.stride)
        inputs = pair_input(image_size, f"{name}_input")
        features = {}
        x = inputs
        for layer_name, multiple, strides in VTN_ENCODER:
            x = conv(channels * multiple, 3, strides, f"{name}_{layer_name}",
                     kernel_initializer=RELEASE_INIT)(x)
            features[layer_name] = x

        skips = ("conv5_1", "conv4_1", "conv3_1", "conv2", "conv1")
        for level, skip_name in zip((6, 5, 4, 3, 2), skips):
            skip = features[skip_name]
            prediction = conv(3, 3, 1, f"{name}_pred{level}", activation=False,
                              kernel_initializer=flow_head_init())(x)
            prediction = crop_to(upconv(3, f"{name}_upsamp{level}to{level - 1}",
                                        activation=False, use_bias=False,
                                        kernel_initializer=RELEASE_INIT)(prediction),
                                 skip, f"{name}_crop_pred{level}")
            x = crop_to(upconv(skip.shape[-1], f"{name}_deconv{level}",
                               kernel_initializer=RELEASE_INIT)(x), skip,
                        f"{name}_crop_deconv{level}")
            x = keras.layers.Concatenate(name=f"{name}_concat{level - 1}")(
                [skip, x, prediction])
        flow = upconv(3, f"{name}_pred0", activation=False,
                      kernel_initializer=flow_head_init())(x)
        flow = crop_to(flow, inputs, f"{name}_crop_pred0")
        flow = Scale(20.0 * flow_multiplier, name=f"{name}_flow")(flow)
        super().__init__(inputs=inputs, outputs=flow, name=name, **kwargs)
        self.image_size, self.channels = image_size, channels
        self.flow_multiplier = float(flow_multiplier)

    def get_config(self):
        return {"image_size": list(self.image_size), "channels": self.channels,
                "flow_multiplier": self.flow_multiplier, "name": self.name}

    @classmethod
    def from_config(cls, config):
        return cls(**config)
