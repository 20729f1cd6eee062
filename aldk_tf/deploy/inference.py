"""Fast in-process inference: a fixed-signature ``tf.function`` over a prepared graph.

:func:`registration_function` is what to call in-process (and what ``bench/inference.py``
times)::

    register = registration_function(model)                 # model: a RecursiveCascade
    outputs = register(fixed, moving)        # [1, D, H, W, 1] float32 each
    outputs["flow"], outputs["warped"]       # [1, D, H, W, 3], [1, D, H, W, 1] float32

It traces once (fixed ``input_signature``), on a private copy of the model's
registration graph (:func:`inference_graph`) with two inference-only choices:

- ``subpixel`` (default on): every stride-2, kernel-4 ``Conv3DTranspose`` of at most
  :data:`SUBPIXEL_MAX_FILTERS` filters (the flow heads) runs as the equivalent forward
  convolution (kernel 2, eight output phases at once) followed by a depth-to-space shuffle
  (:func:`transposed_conv3d`). Same numbers (to float rounding), several times faster on
  CPU for the full-resolution 3-channel flow head (``bench/inference.py`` measures it),
  because oneDNN's backward-data kernel behind ``Conv3DBackpropInputV2`` is slow for few
  output channels. A flow head that feeds only its cascade's flow multiplier takes the
  multiplier into its kernel and bias, and its shuffle writes the float32 flow.
- ``dtype="bfloat16"``: the convolutions (and their activations, concatenations,
  poolings) compute in bfloat16 (Keras ``mixed_bfloat16`` policy: float32 weights cast
  on use), the deformable flow heads included (oneDNN accumulates in float32; their
  bfloat16 output, about 3 significant digits, is written as float32 by their shuffle).
  The layers that produce geometry from it -- the affine stem's ``W`` and
  ``b`` heads, warps, flow composition, affine flow, up/downsampling -- stay float32, so
  ``flow`` and ``warped`` are float32 either way. ``bench/bf16_dice.py`` checks the Dice
  change.

:func:`graph_ops` / :func:`slow_ops` list what a traced or exported graph will run, to
check that nothing falls back to a slow path (``bench/inference.py`` prints it per row).
"""

from __future__ import annotations

import types
from collections import Counter

import keras
import tensorflow as tf

from aldk_tf import layers as spatial_layers
from aldk_tf.compiled import xla
from aldk_tf.deploy.export_layout import DTYPES
from aldk_tf.networks.affine import AffineStem

#: Op types that should not appear in a registration graph, and why.
SLOW_OPS = {
    "PyFunc": "Python callback", "EagerPyFunc": "Python callback",
    "NumpyFunction": "Python callback",
    "While": "graph loop (per-sample or per-label work)",
    "StatelessWhile": "graph loop (per-sample or per-label work)",
}
#: Op types that are slow outside an XLA cluster (the warp's gathers and scatters).
SLOW_WITHOUT_XLA = ("GatherV2", "GatherNd", "ResourceGather", "TensorScatterAdd",
                    "ScatterNd")

# Layers that carry geometry (flows, matrices) keep float32 under dtype="bfloat16".
_FLOAT32_LAYERS = (spatial_layers.Warp, spatial_layers.UpsampleFlowAndWarp,
                   spatial_layers.AffineFlow,
                   spatial_layers.ComposeFlows, spatial_layers.ComposeAffine,
                   spatial_layers.Scale, spatial_layers.Downsample,
                   spatial_layers.UpsampleFlow, spatial_layers.JacobianDeterminant)
# Feature layers that compute in bfloat16 under dtype="bfloat16".
_BFLOAT16_LAYERS = (keras.layers.Conv3D, keras.layers.Conv3DTranspose,
                    keras.layers.Concatenate, keras.layers.AveragePooling3D,
                    keras.layers.Cropping3D, keras.layers.UpSampling3D,
                    keras.layers.LeakyReLU)
_GEOMETRY_CHANNELS = (3, 9)        # the affine stem's b and W heads
# The sub-pixel form only pays off for few output channels (measured at 128^3: 3 -> 3.5x
# faster; 16 or more -> no gain or slower), i.e. for the flow heads.
SUBPIXEL_MAX_FILTERS = 8


# ----------------------------------------------------------------------------- sub-pixel
# A stride-2, kernel-4, 'same' transposed convolution writes output 2j + p (p = 0, 1)
# from inputs j - 1 + p + a (a = 0, 1) through kernel taps 3 - p - 2a, per axis. All
# eight output phases therefore read the same 2x2x2 input windows of the input padded by
# one voxel: one kernel-2 'valid' convolution with 8 x filters output channels, then a
# depth-to-space shuffle that takes phase (pd, ph, pw) from the window offset by it.
# Kernel taps used by phase p for inputs j - 1 + p + a, a = 0, 1: (3, 1) and (2, 0).
_PHASE_TAPS = (slice(3, None, -2), slice(2, None, -2))


def _phase_kernel(kernel: tf.Tensor) -> tf.Tensor:
    """``[4, 4, 4, filters, in]`` transposed-conv kernel -> ``[2, 2, 2, in, 8 * filters]``.

    Output channel ``((pd * 2 + ph) * 2 + pw) * filters + c`` is phase (pd, ph, pw)."""
    kernel = tf.transpose(kernel, [0, 1, 2, 4, 3])                     # [4, 4, 4, in, f]
    return tf.concat([kernel[_PHASE_TAPS[pd], _PHASE_TAPS[ph], _PHASE_TAPS[pw]]
                      for pd in (0, 1) for ph in (0, 1) for pw in (0, 1)], axis=-1)


def _depth_to_space(phases: tf.Tensor, dtype=None) -> tf.Tensor:
    """Phase outputs ``[B, n+1, m+1, k+1, 8 f]`` (padded grid) -> ``[B, 2n, 2m, 2k, f]``
    (cast to ``dtype`` if given: in the same loop under XLA)."""
    shape = tf.shape(phases)
    n, m, k = shape[1] - 1, shape[2] - 1, shape[3] - 1
    parts = tf.split(phases, 8, axis=-1)
    picked = [parts[(pd * 2 + ph) * 2 + pw][:, pd:pd + n, ph:ph + m, pw:pw + k, :]
              for pd in (0, 1) for ph in (0, 1) for pw in (0, 1)]
    filters = shape[4] // 8
    stacked = tf.reshape(tf.stack(picked, axis=4),
                         tf.stack([shape[0], n, m, k, 2, 2, 2, filters]))
    stacked = tf.transpose(stacked, [0, 1, 4, 2, 5, 3, 6, 7])
    result = tf.reshape(stacked, tf.stack([shape[0], 2 * n, 2 * m, 2 * k, filters]))
    return result if dtype is None else tf.cast(result, dtype)


# XLA fuses the eight slices, the stack and the transpose into one loop (~5x faster).
_depth_to_space_xla = xla(_depth_to_space)


def transposed_conv3d(inputs: tf.Tensor, kernel: tf.Tensor, bias=None,
                      activation=None, output_dtype=None) -> tf.Tensor:
    """``Conv3DTranspose(kernel_size=4, strides=2, padding="same")`` as a forward conv.

    Args:
      inputs: ``[B, n, m, l, in]``.
      kernel: ``[4, 4, 4, filters, in]`` (Keras's transposed-conv layout).
      bias: ``[filters]`` or None; activation: a callable or None (applied elementwise
        before the shuffle, which commutes with it).
      output_dtype: the result's dtype (default the input's), cast inside the shuffle.
    Returns:
      ``[B, 2n, 2m, 2l, filters]``, equal to ``tf.nn.conv3d_transpose(inputs, kernel,
      strides 2, "SAME")`` (+ bias, activation) up to float rounding.
    """
    inputs = tf.convert_to_tensor(inputs)
    kernel = tf.cast(kernel, inputs.dtype)
    if kernel.shape.rank != 5 or tuple(kernel.shape[:3]) != (4, 4, 4):
        raise ValueError(f"kernel: expected shape [4, 4, 4, filters, in], got "
                         f"{kernel.shape}")
    padded = tf.pad(inputs, [[0, 0], [1, 1], [1, 1], [1, 1], [0, 0]])
    phases = tf.nn.conv3d(padded, _phase_kernel(kernel), [1, 1, 1, 1, 1], "VALID")
    if bias is not None:
        phases = tf.nn.bias_add(phases, tf.tile(tf.cast(bias, phases.dtype), [8]))
    if activation is not None:
        phases = activation(phases)
    return _depth_to_space_xla(phases, None if output_dtype is None
                               else tf.as_dtype(output_dtype))


def _subpixel_eligible(layer) -> bool:
    return (isinstance(layer, keras.layers.Conv3DTranspose)
            and tuple(layer.kernel_size) == (4, 4, 4) and tuple(layer.strides) == (2, 2, 2)
            and layer.padding == "same" and layer.data_format == "channels_last"
            and tuple(layer.dilation_rate) == (1, 1, 1) and layer.output_padding is None
            and getattr(layer, "groups", 1) == 1 and layer.filters <= SUBPIXEL_MAX_FILTERS)


def _subpixel_call(self, inputs):
    """``Conv3DTranspose.call`` through :func:`transposed_conv3d` (bound per layer)."""
    return transposed_conv3d(inputs, self.kernel, self.bias if self.use_bias else None,
                             self.activation)


# A flow head (a thin transposed convolution without activation) feeding only the flow
# multiplier: the multiplier moves into the head's kernel and bias (a linear map: the same
# numbers up to rounding) and the head's shuffle writes the float32 flow directly, which
# saves a pass over the full-resolution flow (and, under bfloat16, the cast's pass).
def _folded_heads(model) -> list[tuple]:
    """``(head, scale)`` pairs of eligible flow heads and the Scale layer they feed."""
    pairs = []
    for scale in _all_layers(model):
        if not isinstance(scale, spatial_layers.Scale) or len(scale._inbound_nodes) != 1:
            continue
        tensors = scale._inbound_nodes[0].input_tensors
        head = tensors[0]._keras_history.operation if len(tensors) == 1 else None
        if (_subpixel_eligible(head) and head.activation in (None, keras.activations.linear)
                and len(head._inbound_nodes) == 1 and len(head._outbound_nodes) == 1):
            pairs.append((head, scale))
    return pairs


def _folded_head_call(self, inputs):
    """A flow head's ``call`` with its multiplier folded in, float32 out (bound per layer)."""
    factor = self._folded_factor
    bias = self.bias * factor if self.use_bias else None
    return transposed_conv3d(inputs, self.kernel * factor, bias,
                             output_dtype=tf.float32)


def _passthrough_call(self, inputs):
    """``Scale.call`` when its factor moved into the flow head (bound per layer)."""
    return inputs


# ----------------------------------------------------------------------------- pairs
# Concatenating two 1-channel volumes along the channel axis (the image pair each network
# reads) interleaves them voxel by voxel, which TensorFlow's concat kernel does one
# element at a time (12 ms for a 128^3 pair on the 2-core machine of bench/inference.py).
# Zero-padding each input to the full channel count and adding is the same result (x + 0
# is x) and one elementwise loop under XLA (~1 ms); for wide channels the kernel copies
# contiguous runs and is as fast as it gets.
CONCAT_MAX_CHANNELS = 8


def _concat_by_padding(tensors):
    total = sum(int(t.shape[-1]) for t in tensors)
    result, start = None, 0
    for tensor in tensors:
        width = int(tensor.shape[-1])
        padded = tf.pad(tensor, [[0, 0]] * (tensor.shape.rank - 1)
                        + [[start, total - start - width]])
        result = padded if result is None else result + padded
        start += width
    return result


_concat_by_padding_xla = xla(_concat_by_padding)


def _narrow_concat_eligible(layer) -> bool:
    if not isinstance(layer, keras.layers.Concatenate) or layer.axis not in (-1, 4):
        return False
    try:
        shape = layer.output.shape
    except (AttributeError, ValueError):                 # never called in a graph
        return False
    return shape[-1] is not None and shape[-1] <= CONCAT_MAX_CHANNELS


def _narrow_concat_call(self, inputs):
    """``Concatenate.call`` through :func:`_concat_by_padding` (bound per layer)."""
    return _concat_by_padding_xla(list(inputs))


# ----------------------------------------------------------------------------- graph
def _all_layers(model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)


def _copy(model) -> keras.Model:
    """A copy with the same weights, so per-layer changes never touch ``model``."""
    if hasattr(model, "registration_model"):          # RecursiveCascade
        clone = type(model).from_config(model.get_config())
    else:
        clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return clone


def _affine_heads(model) -> set[int]:
    """``id``s of the affine stems' ``W`` and ``b`` heads (kept float32 under bfloat16:
    a matrix entry is one sum over the whole grid)."""
    return {id(layer) for stem in _all_layers(model) if isinstance(stem, AffineStem)
            for layer in stem.layers if getattr(layer, "filters", None) in _GEOMETRY_CHANNELS}


def _input_smaller_than_kernel(layer) -> bool:
    """A forward convolution whose input is, along some axis, shorter than its kernel
    (the deepest levels of a VTN: 1-2 voxels under a 3x3x3 kernel).

    Such a layer stays float32 under bfloat16: oneDNN's bfloat16 weight gradient
    (``Conv3DBackpropFilter``) of it reads memory it never wrote -- garbage such as 1e16
    or NaN where the float32 gradient is finite (TensorFlow 2.21 on an AVX512-BF16 CPU;
    ``tests/test_inference.py`` checks every case). Through the global gradient-norm clip
    one such gradient made a whole step a no-op, a NaN one made every weight NaN. The
    layers are tiny (a few voxels), so float32 costs nothing measurable."""
    if (not isinstance(layer, keras.layers.Conv3D)
            or isinstance(layer, keras.layers.Conv3DTranspose)):
        return False
    try:
        shape = layer.input.shape
    except (AttributeError, ValueError):                 # never called in a graph
        return False
    return any(n is not None and n < k for n, k in zip(shape[1:4], layer.kernel_size))


def _use_bfloat16(layer, keep_float32: set[int]) -> None:
    if isinstance(layer, _FLOAT32_LAYERS) or not isinstance(layer, _BFLOAT16_LAYERS):
        return
    if id(layer) in keep_float32 or _narrow_concat_eligible(layer):
        return          # affine matrix heads, and image pairs (the networks' float32 input)
    if _input_smaller_than_kernel(layer):
        return          # see the function: a wrong bfloat16 weight gradient
    layer.dtype_policy = "mixed_bfloat16"
    if isinstance(getattr(layer, "activation", None), keras.layers.Layer):
        layer.activation.dtype_policy = "mixed_bfloat16"


def use_fast_layers(model, subpixel: bool = True) -> keras.Model:
    """Run ``model``'s thin layers in their fast forms, in place, same weights and numbers
    (up to float rounding), differentiable: kernel-4 stride-2 transposed convolutions
    with few filters (the flow heads) as one forward convolution and a shuffle
    (:func:`transposed_conv3d`; ``subpixel``), narrow concatenations (image pairs) as
    padded sums. Used by :func:`inference_graph` and by training
    (:func:`aldk_tf.training.run.build_trainer`), where the flow head's transposed
    convolution was the costliest single kernel of a 64³ student step
    (``bench/train_step.py --profile``). Returns ``model``."""
    for layer in _all_layers(model):
        if subpixel and _subpixel_eligible(layer):
            layer.call = types.MethodType(_subpixel_call, layer)
        if _narrow_concat_eligible(layer):
            layer.call = types.MethodType(_narrow_concat_call, layer)
    return model


def use_bfloat16_layers(model, keep_float32: set[int] | None = None) -> keras.Model:
    """Mixed precision in place: ``model``'s feature layers (convolutions, activations,
    pooling, concatenations of features) compute in bfloat16 on their float32 variables;
    the geometry (affine ``W``/``b`` heads, flows, warps, compositions), the image
    pairs and convolutions on inputs smaller than their kernel stay float32. Inference
    (``dtype="bfloat16"``) and training (``TrainConfig.precision``) use the same split.
    Returns ``model``."""
    keep_float32 = _affine_heads(model) if keep_float32 is None else keep_float32
    for layer in _all_layers(model):
        _use_bfloat16(layer, keep_float32)
    return model


def inference_graph(model, dtype: str = "float32", subpixel: bool = True) -> keras.Model:
    """A copy of ``model``'s registration graph prepared for inference.

    Args:
      model: a :class:`~aldk_tf.networks.RecursiveCascade` or a Keras model taking
        ``{"fixed", "moving"}`` and returning at least ``flow`` and ``warped``.
      dtype: "float32" or "bfloat16" (see the module docstring).
      subpixel: run kernel-4 stride-2 transposed convolutions as forward convolutions.
    Returns:
      ``{"fixed", "moving"} -> {"flow", "warped"}`` (float32), weights copied.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    clone = _copy(model)
    keep_float32 = _affine_heads(clone)          # before any layer changes its dtype
    use_fast_layers(clone, subpixel=subpixel)
    if dtype == "bfloat16":
        use_bfloat16_layers(clone, keep_float32)
    if subpixel:
        for head, scale in _folded_heads(clone):
            head._folded_factor = scale.factor
            head.call = types.MethodType(_folded_head_call, head)
            scale.call = types.MethodType(_passthrough_call, scale)
    if getattr(clone, "resolution_factor", 1) > 1:
        return _fused_cross_resolution(clone)
    if hasattr(clone, "registration_model"):
        return clone.registration_model()
    return keras.Model(clone.input, {key: clone.output[key] for key in ("flow", "warped")})


def _fused_cross_resolution(model) -> keras.Model:
    """A cross-resolution cascade's registration graph with its last two steps (flow
    upsampling, full-resolution warp) as one XLA loop; same outputs as
    ``model.registration_model()``."""
    flow, warped = spatial_layers.UpsampleFlowAndWarp(
        model.resolution_factor, name="upsample_flow_and_warp")(
            [model.input["moving"], model.output["low_flow"]])
    return keras.Model(inputs=model.input, outputs={"flow": flow, "warped": warped},
                       name=f"{model.name}_register")


def model_image_size(model) -> tuple[int, int, int]:
    """``(D, H, W)`` of a registration model's inputs."""
    inputs = model.input["fixed"] if isinstance(model.input, dict) else model.input[0]
    return tuple(int(n) for n in inputs.shape[1:4])


def registration_function(model, batch: int = 1, dtype: str = "float32",
                          subpixel: bool = True):
    """``register(fixed, moving) -> {"flow", "warped"}``: a ``tf.function`` with a fixed
    ``input_signature`` (``[batch, D, H, W, 1]`` float32 each) over
    :func:`inference_graph`; both outputs float32.

    The function carries ``graph`` (the prepared Keras model, e.g. for
    :func:`aldk_tf.deploy.serving.save_savedmodel`) and ``image_size``.
    """
    graph = inference_graph(model, dtype=dtype, subpixel=subpixel)
    size = model_image_size(graph)
    image = tf.TensorSpec([batch, *size, 1], tf.float32)

    @tf.function(input_signature=[image, image])
    def register(fixed, moving):
        outputs = graph({"fixed": fixed, "moving": moving}, training=False)
        return {key: tf.cast(outputs[key], tf.float32) for key in ("flow", "warped")}

    register.graph, register.image_size = graph, size
    return register


# ----------------------------------------------------------------------------- op check
def _walk(function):
    """Yield ``(node, nodes_by_name, compiled)`` for every node a concrete function runs,
    following nested functions; ``compiled``: inside an ``_XlaMustCompile`` function
    or call (and below it)."""
    graph_def = function.graph.as_graph_def()
    library = {f.signature.name: f for f in graph_def.library.function}
    seen = set()

    def called(node):
        for value in node.attr.values():
            if value.HasField("func") and value.func.name in library:
                yield value.func.name
            for item in value.list.func:
                if item.name in library:
                    yield item.name

    def marked(attributes) -> bool:
        value = attributes.get(XLA_MUST_COMPILE)
        return bool(value is not None and value.b)

    def visit(nodes, compiled):
        by_name = {node.name: node for node in nodes}
        for node in nodes:
            yield node, by_name, compiled
            for name in called(node):
                inner = compiled or marked(node.attr) or marked(library[name].attr)
                if (name, inner) not in seen:
                    seen.add((name, inner))
                    yield from visit(library[name].node_def, inner)

    yield from visit(graph_def.node, False)


XLA_MUST_COMPILE = "_XlaMustCompile"


def graph_ops(function) -> dict[str, Counter]:
    """Op types a concrete function will run: ``{"graph": Counter, "xla": Counter}``.

    ``function``: a ``ConcreteFunction`` (e.g. ``register.get_concrete_function()`` or a
    reloaded SavedModel's ``signatures["serving_default"]``). Nested functions are
    followed; ops under an ``_XlaMustCompile`` function or call count under ``"xla"``
    (they run as one compiled cluster).
    """
    counts = {"graph": Counter(), "xla": Counter()}
    for node, _, compiled in _walk(function):
        counts["xla" if compiled else "graph"][node.op] += 1
    return counts


def _constant(node) -> list | None:
    if node is None or node.op != "Const":
        return None
    return tf.make_ndarray(node.attr["value"].tensor).reshape(-1).tolist()


def _transposed_conv_filters(node, by_name) -> int | None:
    """Output channels of a ``Conv3DBackpropInputV2`` node (its ``input_sizes``' last
    entry), when the graph holds them as constants."""
    def producer(name):
        return by_name.get(name.lstrip("^").split(":")[0])
    sizes = producer(node.input[0])
    values = _constant(sizes)
    if values is None and sizes is not None and sizes.op == "Pack":
        values = _constant(producer(sizes.input[-1]))
    return int(values[-1]) if values else None


def slow_ops(function) -> dict[str, str]:
    """``{op type: reason}`` for what should not be in a registration graph (empty when
    clean): :data:`SLOW_OPS`, gathers/scatters outside XLA, and transposed convolutions
    with at most :data:`SUBPIXEL_MAX_FILTERS` output channels (the sub-pixel form is
    faster there)."""
    found = {}
    for node, by_name, compiled in _walk(function):
        if node.op == "Conv3DBackpropInputV2":
            filters = _transposed_conv_filters(node, by_name)
            if filters is None or filters <= SUBPIXEL_MAX_FILTERS:
                found[node.op] = (f"transposed 3-D convolution to "
                                  f"{filters or 'unknown'} channels (oneDNN backward-data "
                                  f"kernel; the sub-pixel form is ~3x faster here)")
        elif node.op in SLOW_OPS:
            found[node.op] = SLOW_OPS[node.op]
        elif node.op in SLOW_WITHOUT_XLA and not compiled:
            found[node.op] = "gather/scatter outside XLA (the warp without its XLA cluster)"
    return found
