"""Shape checks and slicing shared by the spatial functions (MONAI-style messages)."""

from __future__ import annotations

import tensorflow as tf


def check_volume(name: str, tensor: tf.Tensor, channels: int | None = None) -> None:
    """Raise ``ValueError`` unless ``tensor`` is a 5-D channels-last volume."""
    shape = tensor.shape
    if shape.rank != 5:
        raise ValueError(
            f"{name}: expected a 5-D tensor [B, D, H, W, C], got rank {shape.rank} "
            f"with shape {shape}")
    if channels is not None and shape[-1] is not None and shape[-1] != channels:
        raise ValueError(
            f"{name}: expected {channels} channels in the last axis, got shape {shape}")


def check_same_grid(image: tf.Tensor, flow: tf.Tensor) -> None:
    image_grid, flow_grid = image.shape[1:4], flow.shape[1:4]
    if image_grid.is_fully_defined() and flow_grid.is_fully_defined() and \
            image_grid != flow_grid:
        raise ValueError(
            f"flow: expected spatial shape {image_grid.as_list()} to match the image, "
            f"got {flow_grid.as_list()}")


def slice_along(tensor, axis, start, stop):
    index = [slice(None)] * tensor.shape.rank
    index[axis] = slice(start, stop)
    return tensor[tuple(index)]
