"""Training pairs without end: every step a new (fixed, moving) pair, nothing stored.

A network trained on a few hundred stored pairs of one template learns those pairs. Here
each pair is drawn on the fly (in the idea of SynthMorph, Hoffmann et al., IEEE TMI 2022:
train on images synthesised from label maps, so the network learns to align structures,
not one template's look):

1. **anatomy**: the template's tissue maps (background, CSF, GM, WM), or, for a fraction
   ``shapes`` of the pairs, random-shape label maps inside the template's brain outline
   (``shape_labels`` smooth random fields, soft-argmaxed); both scans of a pair come from
   the same anatomy;
2. **per scan, a different brain**: the tissue maps reweighted by smooth random log-fields
   (structures widen or narrow: shapes a smooth warp of the template cannot reach), then
   deformed by a large random diffeomorphism (a stationary velocity field on a
   ``control_grid``³ grid integrated by scaling and squaring, composed with a random
   affine map); the scan's labels are the argmax of its deformed maps;
3. **per scan, an image**: ``synth`` draws one intensity per label for the pair
   (uniform in [0, 1], background 0: skull-stripped scans) and per-label texture; ``real``
   uses the template's T1, its tissue contrast moved where the reweighting moved tissue;
   ``mixed`` chooses one of the two per pair (``synth_fraction``). Then, per scan, a
   smooth multiplicative bias field, an anisotropic Gaussian blur (a lower resolution
   along a random axis), a gamma change, normalisation to a maximum of 1, and noise.

A pair's contrast is shared by its two scans (the similarity loss is a correlation);
everything else differs between them. Pair ``k`` of seed ``s`` depends only on ``(s, k)``
(stateless random ops): the stream is reproducible, and a resumed run starts at its pair
without replaying the ones before it.

Elements: ``fixed``, ``moving`` ``[S, S, S, 1]`` float32 in [0, 1], ``fixed_labels``,
``moving_labels`` ``[S, S, S, C]`` float32 one-hot (``C`` = 4, or 1 + ``shape_labels``
when random shapes are on; template pairs leave the extra channels empty).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from aldk_tf import spatial

from .augment import upsample_control

SOURCES = ("synth", "real", "mixed")
SQUARINGS = 6
BLUR_RADIUS = 4                # voxels each side of the blur kernel (covers sigma <= 1.5)
TISSUE_CONTROLS = 4
BIAS_CONTROLS = 4
SHAPE_CONTROLS = 6
SHAPE_SHARPNESS = 8.0          # soft-argmax temperature of the random-shape fields


@dataclass(frozen=True)
class GeneratorSettings:
    """How pairs are drawn (see the module docstring); ``to_dict`` goes into config.json."""
    source: str = "mixed"           # "synth" | "real" | "mixed" (per pair)
    synth_fraction: float = 0.5     # with "mixed": share of synthesised-intensity pairs
    shapes: float = 0.0             # share of pairs from random-shape label maps
    shape_labels: int = 12
    velocity_std: float = 0.035     # velocity control std, fraction of the size
    control_grid: int = 5
    max_rotation_deg: float = 12.0
    max_scale: float = 0.12         # scale per axis in [1 - s, 1 + s]
    max_shift: float = 0.04         # translation, fraction of the size
    tissue_log_std: float = 0.6     # std of the tissue reweighting log-fields' controls
    bias_std: float = 0.2           # std of the log bias field's controls
    max_blur: float = 1.2           # voxels, Gaussian std per axis in [0, max_blur]
    gamma_std: float = 0.25         # log of the gamma exponent ~ N(0, gamma_std)
    texture_std: float = 0.06       # per-label texture std, up to this (synth)
    max_noise: float = 0.03         # noise std, uniform in [0, max_noise]

    def __post_init__(self):
        checks = [(self.source in SOURCES, f"source: expected one of {SOURCES}, got "
                                            f"{self.source!r}"),
                  (0.0 <= self.synth_fraction <= 1.0, "synth_fraction: expected [0, 1]"),
                  (0.0 <= self.shapes <= 1.0, "shapes: expected [0, 1]"),
                  (self.shape_labels >= 3, "shape_labels: expected at least 3"),
                  (self.control_grid >= 2, "control_grid: expected at least 2"),
                  (0.0 <= self.max_blur <= 1.5, "max_blur: expected [0, 1.5] voxels")]
        for name in ("velocity_std", "max_rotation_deg", "max_scale", "max_shift",
                     "tissue_log_std", "bias_std", "gamma_std", "texture_std", "max_noise"):
            checks.append((getattr(self, name) >= 0.0, f"{name}: expected >= 0"))
        for ok, message in checks:
            if not ok:
                raise ValueError(f"generator {message}")

    @property
    def channels(self) -> int:
        """Label channels of every element (static: template and shape pairs share it)."""
        return 1 + self.shape_labels if self.shapes > 0 else 4

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "GeneratorSettings":
        return cls(**data)


def template_tensors(template: dict, channels: int) -> dict:
    """The template (``t1`` [S, S, S], ``probabilities`` [S, S, S, 4]) as constants, its
    maps padded with empty channels to ``channels``, and its tissue means (for ``real``)."""
    probabilities = np.asarray(template["probabilities"], np.float32)
    t1 = np.asarray(template["t1"], np.float32)
    labels = np.argmax(probabilities, axis=-1)
    means = np.array([t1[labels == k].mean() if np.any(labels == k) else 0.0
                      for k in range(probabilities.shape[-1])], np.float32)
    padding = channels - probabilities.shape[-1]
    if padding < 0:
        raise ValueError(f"generator: {channels} label channels cannot hold the "
                         f"template's {probabilities.shape[-1]}")
    probabilities = np.pad(probabilities, [(0, 0)] * 3 + [(0, padding)])
    means = np.pad(means, (0, padding))
    return {"t1": tf.constant(t1[..., None]), "probabilities": tf.constant(probabilities),
            "means": tf.constant(means)}


def _seed(seed, *parts) -> tf.Tensor:
    """A stateless seed ``[2]`` for one draw of pair ``seed[1]`` (``parts`` name it)."""
    mixed = tf.cast(seed[1], tf.int64) * 1009
    for part in parts:
        mixed = mixed * 31 + part
    return tf.stack([tf.cast(seed[0], tf.int64), mixed])


def _uniform(seed, shape=(), low=0.0, high=1.0):
    return tf.random.stateless_uniform(shape, seed=seed, minval=low, maxval=high)


def _normal(seed, shape=(), std=1.0):
    return tf.random.stateless_normal(shape, seed=seed, stddev=std)


def smooth_field(seed, size: int, controls: int, channels: int, std: float) -> tf.Tensor:
    """A smooth random field ``[1, S, S, S, channels]``: ``controls``³ normal values
    (std ``std``) interpolated by a natural cubic spline."""
    control = _normal(seed, (1, controls, controls, controls, channels), std)
    return upsample_control(control, (size,) * 3)


def _rotation(angles: tf.Tensor) -> tf.Tensor:
    matrix = tf.eye(3)
    for axis in range(3):
        i, j = [a for a in range(3) if a != axis]
        c, s = tf.cos(angles[axis]), tf.sin(angles[axis])
        turn = tf.tensor_scatter_nd_update(tf.eye(3), [[i, i], [j, j], [i, j], [j, i]],
                                           tf.stack([c, c, -s, s]))
        matrix = matrix @ turn
    return matrix


def random_deformation(seed, size: int, settings: GeneratorSettings) -> tf.Tensor:
    """A random diffeomorphism's flow ``[1, S, S, S, 3]`` (voxels): a stationary velocity
    field integrated by scaling and squaring, then an affine map. Integrated at half the
    size (the field is smooth) when ``size`` is even and above 32, then upsampled."""
    factor = 2 if size > 32 and size % 2 == 0 else 1
    work = size // factor
    g = settings.control_grid
    control = _normal(_seed(seed, 1), (1, g, g, g, 3), settings.velocity_std * work)
    flow = upsample_control(control, (work,) * 3) / 2.0 ** SQUARINGS
    for _ in range(SQUARINGS):
        flow = spatial.compose(flow, flow)
    angles = _uniform(_seed(seed, 2), (3,), -1.0, 1.0) * math.radians(
        settings.max_rotation_deg)
    scales = 1.0 + _uniform(_seed(seed, 3), (3,), -1.0, 1.0) * settings.max_scale
    matrix = _rotation(angles) @ tf.linalg.diag(scales) - tf.eye(3)
    shift = _uniform(_seed(seed, 4), (1, 3), -1.0, 1.0) * settings.max_shift * work
    flow = spatial.compose(spatial.affine_flow(matrix[None], shift, (work,) * 3), flow)
    return spatial.upsample_flow(flow, factor) if factor > 1 else flow


def _blur_axis(volume: tf.Tensor, sigma: tf.Tensor, axis: int) -> tf.Tensor:
    """Gaussian blur of ``[1, S, S, S, C]`` along spatial ``axis`` (edges clamped)."""
    offsets = tf.range(-BLUR_RADIUS, BLUR_RADIUS + 1, dtype=tf.float32)
    kernel = tf.exp(-0.5 * (offsets / tf.maximum(sigma, 1e-3)) ** 2)
    kernel = kernel / tf.reduce_sum(kernel)
    channels = volume.shape[-1]
    shape = [1, 1, 1, 1, 1]
    shape[axis] = 2 * BLUR_RADIUS + 1
    filters = tf.reshape(kernel, shape) * tf.reshape(tf.eye(channels),
                                                     [1, 1, 1, channels, channels])
    paddings = [[0, 0]] * 5
    paddings[axis + 1] = [BLUR_RADIUS, BLUR_RADIUS]
    padded = tf.pad(volume, paddings, mode="SYMMETRIC")
    return tf.nn.conv3d(padded, filters, [1] * 5, "VALID")


def blur(volume: tf.Tensor, sigmas: tf.Tensor) -> tf.Tensor:
    """Anisotropic Gaussian blur, std ``sigmas[i]`` voxels along axis ``i`` (< 0.2: none)."""
    for axis in range(3):
        volume = tf.ensure_shape(
            tf.cond(sigmas[axis] < 0.2, lambda v=volume: v,
                    lambda v=volume, a=axis: _blur_axis(v, sigmas[a], a)), volume.shape)
    return volume


def random_shapes(seed, probabilities: tf.Tensor, settings: GeneratorSettings) -> tf.Tensor:
    """Random-shape tissue maps inside the template's brain: ``[S, S, S, C]``."""
    size = probabilities.shape[0]
    fields = smooth_field(_seed(seed, 20), size, SHAPE_CONTROLS, settings.shape_labels,
                          1.0)[0]
    shapes = tf.nn.softmax(SHAPE_SHARPNESS * fields, axis=-1)
    background = probabilities[..., :1]
    return tf.concat([background, (1.0 - background) * shapes], axis=-1)


def reweight_tissue(seed, probabilities: tf.Tensor, std: float) -> tf.Tensor:
    """Tissue maps reweighted by smooth random log-fields, renormalised inside the brain
    (the background channel is kept)."""
    size, channels = probabilities.shape[0], probabilities.shape[-1]
    weights = tf.exp(smooth_field(seed, size, TISSUE_CONTROLS, channels - 1, std)[0])
    background = probabilities[..., :1]
    tissue = probabilities[..., 1:] * weights
    tissue = tissue / tf.maximum(tf.reduce_sum(tissue, -1, keepdims=True), 1e-6)
    return tf.concat([background, tissue * (1.0 - background)], axis=-1)


def _draw_scan(seed, template: dict, anatomy: tf.Tensor, contrast: dict, synth,
               settings: GeneratorSettings) -> tuple[tf.Tensor, tf.Tensor]:
    """One scan of a pair: ``(image [S, S, S, 1], one-hot labels [S, S, S, C])``."""
    size, channels = anatomy.shape[0], anatomy.shape[-1]
    varied = reweight_tissue(_seed(seed, 10), anatomy, settings.tissue_log_std)
    flow = random_deformation(seed, size, settings)
    maps = spatial.warp(varied[None], flow)[0]                        # [S, S, S, C]
    labels = tf.one_hot(tf.argmax(maps, axis=-1), channels)

    def synthesised():
        texture = tf.reduce_sum(maps * contrast["texture"], -1, keepdims=True)
        return (tf.reduce_sum(maps * contrast["means"], -1, keepdims=True)
                + texture * _normal(_seed(seed, 11), (size, size, size, 1)))

    def real():
        # The template's T1 with its contrast moved where the reweighting moved tissue.
        means = template["means"]
        ratio = (tf.reduce_sum(varied * means, -1, keepdims=True)
                 / tf.maximum(tf.reduce_sum(anatomy * means, -1, keepdims=True), 1e-3))
        moved = template["t1"] * tf.where(anatomy[..., :1] > 0.999, 1.0, ratio)
        return spatial.warp(moved[None], flow)[0]

    image = tf.ensure_shape(tf.cond(synth, synthesised, real), (size, size, size, 1))
    brain = 1.0 - maps[..., :1]
    brain = tf.where(brain < 0.01, 0.0, brain)        # skull-stripped: exact zeros outside
    sigmas = _uniform(_seed(seed, 12), (3,), 0.0, settings.max_blur)
    image = blur(image[None], sigmas)[0]
    bias = tf.exp(smooth_field(_seed(seed, 13), size, BIAS_CONTROLS, 1,
                               settings.bias_std)[0])
    image = tf.maximum(image * bias, 0.0)
    image = image ** tf.exp(_normal(_seed(seed, 14), (), settings.gamma_std))
    image = image / tf.maximum(tf.reduce_max(image), 1e-6)
    noise = _uniform(_seed(seed, 15), (), 0.0, settings.max_noise)
    image = image + noise * _normal(_seed(seed, 16), (size, size, size, 1))
    return tf.clip_by_value(image * brain, 0.0, 1.0), labels


def draw_pair(seed: int, index, template: dict, settings: GeneratorSettings) -> dict:
    """Pair ``index`` of the stream ``seed`` (see the module docstring)."""
    pair_seed = tf.stack([tf.constant(seed, tf.int64), tf.cast(index, tf.int64)])
    probabilities = template["probabilities"]
    channels = probabilities.shape[-1]
    use_shapes = _uniform(_seed(pair_seed, 30)) < settings.shapes
    anatomy = tf.cond(use_shapes,
                      lambda: random_shapes(pair_seed, probabilities, settings),
                      lambda: probabilities)
    anatomy = tf.ensure_shape(anatomy, probabilities.shape)
    synth = {"synth": tf.constant(True), "real": tf.constant(False)}.get(settings.source)
    if synth is None:
        synth = _uniform(_seed(pair_seed, 31)) < settings.synth_fraction
    synth = tf.logical_or(synth, use_shapes)          # random shapes have no T1
    contrast = {
        "means": tf.concat([[0.0], _uniform(_seed(pair_seed, 32), (channels - 1,))], 0),
        "texture": tf.concat([[0.0], _uniform(_seed(pair_seed, 33), (channels - 1,), 0.0,
                                              settings.texture_std)], 0)}
    scans = {}
    for role, part in (("fixed", 40), ("moving", 41)):
        scan_seed = tf.stack([pair_seed[0], pair_seed[1] * 2 + part - 40])
        scans[role], scans[f"{role}_labels"] = _draw_scan(
            _seed(scan_seed, part), template, anatomy, contrast, synth, settings)
    return scans


def pair_stream(template: dict, settings: GeneratorSettings, batch_size: int,
                seed: int = 0, start_pair: int = 0,
                parallel: int | None = None) -> tf.data.Dataset:
    """Infinite batches of generated pairs, from pair ``start_pair`` of stream ``seed``.

    ``template`` as returned by :func:`aldk_tf.data.demo_set.load_template`. Batch ``k``
    holds pairs ``start_pair + k B .. + B - 1``, so a run resumed at step ``t`` starts at
    ``start_pair = t B`` and sees what an uninterrupted one would.
    """
    tensors = template_tensors(template, settings.channels)
    draw = tf.function(lambda index: draw_pair(seed, index, tensors, settings),
                       reduce_retracing=True)
    dataset = tf.data.Dataset.range(int(start_pair), np.iinfo(np.int64).max)
    dataset = dataset.map(draw, num_parallel_calls=parallel or tf.data.AUTOTUNE,
                          deterministic=True)
    return dataset.batch(batch_size, drop_remainder=True).prefetch(1)
