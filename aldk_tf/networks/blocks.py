"""Small building blocks shared by the networks."""

from __future__ import annotations

import keras

LEAKY_SLOPE = 0.1
#: The release's initialisation of VTN/affine convs (tflearn ``uniform_scaling``: uniform
#: on +-sqrt(3 / fan_in), i.e. LeCun uniform).
RELEASE_INIT = "lecun_uniform"


def flow_head_init():
    """Flow-prediction layers start near zero (as VoxelMorph's head): a network's first
    flows are then close to the identity instead of voxels of noise (the VTN multiplies
    its last prediction by 20)."""
    return keras.initializers.RandomNormal(stddev=1e-5)


def check_image_size(name: str, image_size, stride: int) -> tuple[int, int, int]:
    """Validate a network's input size: three ints, each divisible by ``stride``."""
    size = tuple(int(n) for n in image_size)
    if len(size) != 3 or any(n < stride or n % stride for n in size):
        raise ValueError(
            f"{name}: image_size must be 3 sizes divisible by {stride} (the network's "
            f"total stride), got {tuple(image_size)}")
    return size


def conv(filters, kernel, strides, name, activation=True, use_bias=True,
         kernel_initializer="glorot_uniform"):
    """Conv3D, 'same' padding, LeakyReLU(0.1) unless ``activation`` is False."""
    return keras.layers.Conv3D(
        filters, kernel, strides=strides, padding="same", use_bias=use_bias,
        kernel_initializer=kernel_initializer,
        activation=keras.layers.LeakyReLU(LEAKY_SLOPE) if activation else None, name=name)


def upconv(filters, name, activation=True, use_bias=True, kernel=4,
           kernel_initializer="glorot_uniform"):
    """Conv3DTranspose (stride 2, 'same')."""
    return keras.layers.Conv3DTranspose(
        filters, kernel, strides=2, padding="same", use_bias=use_bias,
        kernel_initializer=kernel_initializer,
        activation=keras.layers.LeakyReLU(LEAKY_SLOPE) if activation else None, name=name)


def crop_to(tensor, reference, name):
    """Crop ``tensor`` at the far end of each spatial axis to ``reference``'s grid.

    A stride-2 transposed conv doubles the grid; where the encoder rounded an odd size
    up (``ceil(n / 2)``) the doubled grid is one voxel too large, like the release's
    ``conv3d_transpose`` with an explicit output shape.
    """
    extra = [int(a) - int(b) for a, b in zip(tensor.shape[1:4], reference.shape[1:4])]
    if not any(extra):
        return tensor
    return keras.layers.Cropping3D(tuple((0, e) for e in extra), name=name)(tensor)


def pair_input(image_size, name):
    return keras.Input(shape=(*image_size, 2), name=name)
