"""The ALDK critic: a strided 3-D conv net scoring a deformation field (or, with
``channels=2``, a registered pair: the fixed image beside the warped moving image)."""

from __future__ import annotations

import keras

from aldk_tf.networks.blocks import LEAKY_SLOPE, check_image_size

CRITIC_FILTERS = (16, 32, 64, 128, 256)


@keras.saving.register_keras_serializable(package="aldk_tf")
class FlowCritic(keras.Model):
    """Flow ``[B, D, H, W, 3]`` -> raw score ``[B, 1]`` (WGAN critic, no sigmoid).

    Five 4x4x4 stride-2 convs (16..256 channels, LeakyReLU), flattened, one linear unit.
    ``output="sigmoid"`` squashes the score into (0, 1) as the ALDK paper's figure has it
    (the training configuration's default, ``ALDKConfig.critic_output``: the raw score
    diverged at demo scale); ``"raw"`` is the WGAN-GP critic's score.
    """

    def __init__(self, image_size=(128, 128, 128), filters=CRITIC_FILTERS, output="raw",
                 name="critic", channels: int = 3, **kwargs):
        if output not in ("raw", "sigmoid"):
            raise ValueError(f"FlowCritic: output must be 'raw' or 'sigmoid', got {output!r}")
        if int(channels) < 1:
            raise ValueError(f"FlowCritic: channels must be >= 1, got {channels}")
        image_size = check_image_size("FlowCritic", image_size, 16)
        flow = keras.Input(shape=(*image_size, int(channels)), name="flow")
        x = flow
        for i, n in enumerate(filters, start=1):
            x = keras.layers.Conv3D(n, 4, strides=2, padding="same",
                                    activation=keras.layers.LeakyReLU(LEAKY_SLOPE),
                                    name=f"{name}_conv{i}")(x)
        x = keras.layers.Flatten(name=f"{name}_flatten")(x)
        score = keras.layers.Dense(1, name=f"{name}_score",
                                   activation="sigmoid" if output == "sigmoid" else None)(x)
        super().__init__(inputs=flow, outputs=score, name=name, **kwargs)
        self.image_size, self.filters = image_size, tuple(int(n) for n in filters)
        self.output_kind, self.channels = output, int(channels)

    def get_config(self):
        return {"image_size": list(self.image_size), "filters": list(self.filters),
                "output": self.output_kind, "name": self.name, "channels": self.channels}

    @classmethod
    def from_config(cls, config):
        return cls(**config)
