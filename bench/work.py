"""Arithmetic work of a Keras registration graph, counted from its layer shapes.

    count_work(register.graph, batch=1)   # {"Conv3D": flops, "Conv3DTranspose": ..., ...}

Counted: multiply-adds of ``Conv3D``, ``Conv3DTranspose`` and ``Dense`` layers, 2 FLOP
each (bias additions, activations, pooling, the warps, flow composition and the
depth-to-space shuffles are left out: they are memory-bound and small in FLOP). Every
call of a layer counts (a cascade network called ``rep`` times counts ``rep`` times),
nested models included, with the shapes of that call.

A ``Conv3DTranspose`` counts what it really runs in the graph the benchmark times:

- as itself: one multiply-add per input voxel, kernel tap, input and output channel
  (the work of a transposed convolution, ``in_voxels * k^3 * c_in * c_out``);
- in the sub-pixel form of :func:`aldk_tf.deploy.inference.inference_graph` (``subpixel=True``
  and the layer eligible): the kernel-2 forward convolution over the input padded by one
  voxel with 8 phases of outputs, ``(n + 1)^3 * 8 * c_in * 8 c_out``, counted under
  ``"Conv3D (sub-pixel)"``; slightly more than the transposed form (the padded border).

``tests/test_bench_work.py`` checks the count against a hand computation and against
TensorFlow's profiler (``Conv3D`` float ops) on a traced student.
"""

from __future__ import annotations

import math

import keras

# The sub-pixel rule of the inference graph (which transposed convolutions it rewrites):
# shared, so that the count follows the graph if the rule changes.
from aldk_tf.deploy.inference import _subpixel_eligible

KINDS = ("Conv3D", "Conv3D (sub-pixel)", "Conv3DTranspose", "Dense")


def _spatial(shape) -> int:
    return math.prod(int(n) for n in shape[1:-1])


def layer_macs(layer, input_shape, output_shape, subpixel: bool = False) -> tuple[str, int]:
    """``(kind, multiply-adds per sample)`` of one call of ``layer``, or ``("", 0)``.

    ``input_shape`` / ``output_shape``: the call's shapes, batch first (ignored)."""
    if isinstance(layer, keras.layers.Conv3DTranspose):
        c_in, c_out = int(input_shape[-1]), int(layer.filters)
        if subpixel and _subpixel_eligible(layer):
            padded = math.prod(int(n) + 1 for n in input_shape[1:-1])
            return "Conv3D (sub-pixel)", padded * 8 * c_in * 8 * c_out
        return "Conv3DTranspose", (_spatial(input_shape) * math.prod(layer.kernel_size)
                                   * c_in * c_out)
    if isinstance(layer, keras.layers.Conv3D):
        groups = getattr(layer, "groups", 1)
        return "Conv3D", (_spatial(output_shape) * math.prod(layer.kernel_size)
                          * (int(input_shape[-1]) // groups) * int(layer.filters))
    if isinstance(layer, keras.layers.Dense):
        return "Dense", math.prod(int(n) for n in input_shape[1:]) * int(layer.units)
    return "", 0


def _calls(model, operation):
    """The nodes (calls) of ``operation`` inside ``model``'s graph.

    Keras keys a graph's nodes ``"<id(operation)>_ib-<index>"`` (``make_node_key`` in
    ``keras.src.ops.function``); a layer shared with another graph keeps only this one's.
    """
    keys = getattr(model, "_nodes", None)
    return [node for index, node in enumerate(operation._inbound_nodes)
            if keys is None or f"{id(operation)}_ib-{index}" in keys]


def _walk(model, subpixel: bool, times: int, totals: dict) -> None:
    for operation in model.operations:
        calls = _calls(model, operation)
        if isinstance(operation, keras.Model):
            _walk(operation, subpixel, times * len(calls), totals)
            continue
        for node in calls:
            if not node.input_tensors or not node.output_tensors:
                continue
            kind, macs = layer_macs(operation, node.input_tensors[0].shape,
                                    node.output_tensors[0].shape, subpixel)
            if kind:
                totals[kind] += 2 * macs * times


def count_work(model, batch: int = 1, subpixel: bool = False) -> dict[str, int]:
    """FLOP (2 per multiply-add) of one call of a functional Keras ``model`` on ``batch``
    samples, per kind (:data:`KINDS`) and ``"total"``.

    ``subpixel``: count eligible transposed convolutions in the sub-pixel form, as
    :func:`~aldk_tf.deploy.inference.inference_graph` runs them. Pass the graph actually run
    (``register.graph`` already has its flags applied; pass the same ``subpixel``)."""
    totals = dict.fromkeys(KINDS, 0)
    _walk(model, subpixel, 1, totals)
    totals = {kind: flops * batch for kind, flops in totals.items()}
    totals["total"] = sum(totals.values())
    return totals


# Memory-bound layers: the bytes a call must move at least (float32), per output voxel.
#   Warp: image C + flow 3 read, C written; ComposeFlows: a 3-channel warp plus the flow
#   read again (3 + 3 + 3 read, 3 written); ComposeAffine: affine flow and flow read,
#   their composition written; AffineFlow: the flow written; UpsampleFlowAndWarp: the
#   image read and the flow and the warped image written (the low-resolution flow: 1/f^3).
def _memory_bytes(operation, inputs, outputs) -> int:
    from aldk_tf import layers as spatial_layers
    voxels = _spatial(outputs[0].shape)
    channels = int(inputs[0].shape[-1])
    if isinstance(operation, spatial_layers.Warp):
        return voxels * 4 * (2 * channels + 3)
    if isinstance(operation, spatial_layers.ComposeFlows):
        return voxels * 4 * 12
    if isinstance(operation, spatial_layers.ComposeAffine):
        return voxels * 4 * 9
    if isinstance(operation, spatial_layers.AffineFlow):
        return voxels * 4 * 3
    if isinstance(operation, spatial_layers.UpsampleFlowAndWarp):
        return voxels * 4 * (2 * channels + 3)
    return 0


def _walk_bytes(model, times: int) -> int:
    total = 0
    for operation in model.operations:
        calls = _calls(model, operation)
        if isinstance(operation, keras.Model):
            total += _walk_bytes(operation, times * len(calls))
            continue
        for node in calls:
            if node.input_tensors and node.output_tensors:
                total += times * _memory_bytes(operation, node.input_tensors,
                                               node.output_tensors)
    return total


def count_memory_bytes(model, batch: int = 1) -> int:
    """Bytes the memory-bound geometry of one call of ``model`` on ``batch`` samples must
    move at least (warps, flow compositions, affine flows; float32): with the measured
    bandwidth, the part of a row's limit that its FLOP do not cover."""
    return _walk_bytes(model, 1) * batch
