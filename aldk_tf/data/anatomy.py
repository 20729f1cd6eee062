"""Anatomies for synthetic subjects: tissue maps from a T1 image, and per-subject variation.

A registration network trained on warps of one template learns that template's anatomy:
its test pairs share the training pairs' brain, only the deformation is new. Two remedies
live here.

* :func:`template_from_t1` turns any skull-stripped T1 volume (zero outside the brain) into
  the template dictionary the demo set is built from (T1 in [0, 1], soft tissue maps,
  labels), classifying tissue by a three-class Gaussian mixture of the brain's intensities
  (CSF darkest, then GM, then WM). Another template can so serve as a held-out anatomy.
* :func:`vary_anatomy` changes a template into a different brain before it is deformed:
  the tissue maps are reweighted by smooth random log-fields (ventricles and sulci widen or
  narrow, cortical thickness changes: shapes a smooth warp of the template cannot reach),
  and the image is re-synthesised as a random mix of the template's T1 and a tissue-mean
  image with random T1-like contrast, then blurred by a random amount.

Every random number comes from the ``numpy.random.Generator`` passed in.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

TISSUE_LOG_STD = 0.6          # std of the tissue maps' log reweighting control values
TISSUE_CONTROLS = 4           # control grid of those fields (per axis)
# Tissue means of the re-synthesised image (T1 ordering CSF < GM < WM), drawn uniformly.
CSF_RANGE, GM_RANGE, WM_RANGE = (0.05, 0.35), (0.35, 0.62), (0.62, 1.0)
MAX_BLUR = 0.7                # voxels, std of the Gaussian blur, drawn uniformly
MIXTURE_ITERATIONS = 50


def smooth_field(rng: np.random.Generator, shape, controls: int, std: float) -> np.ndarray:
    """A smooth random scalar field: ``controls``³ normal values, cubic-spline zoomed."""
    control = rng.normal(0.0, std, (controls,) * 3)
    zoom = [n / controls for n in shape]
    return ndimage.zoom(control, zoom, order=3, mode="nearest", grid_mode=True)[
        :shape[0], :shape[1], :shape[2]]


def vary_anatomy(template: dict, rng: np.random.Generator) -> dict:
    """A new brain from ``template`` (``t1``, ``probabilities`` [..., 4]: background, CSF,
    GM, WM); returns a copy with new ``t1``, ``probabilities`` and ``labels``."""
    probabilities = template["probabilities"].astype(np.float64)
    shape = probabilities.shape[:3]
    brain = 1.0 - probabilities[..., 0]
    weights = np.stack([np.exp(smooth_field(rng, shape, TISSUE_CONTROLS, TISSUE_LOG_STD))
                        for _ in range(3)], axis=-1)
    tissue = probabilities[..., 1:] * weights
    tissue = tissue / np.maximum(tissue.sum(-1, keepdims=True), 1e-6) * brain[..., None]
    probabilities = np.concatenate([probabilities[..., :1], tissue], axis=-1)

    means = np.array([0.0, rng.uniform(*CSF_RANGE), rng.uniform(*GM_RANGE),
                      rng.uniform(*WM_RANGE)])
    synthetic = probabilities @ means
    mix = rng.uniform(0.0, 1.0)
    t1 = mix * template["t1"] + (1.0 - mix) * synthetic
    blur = rng.uniform(0.0, MAX_BLUR)
    if blur > 0.05:
        t1 = ndimage.gaussian_filter(t1, blur)
    return {**template, "t1": np.clip(t1, 0.0, 1.0).astype(np.float32),
            "probabilities": probabilities.astype(np.float32),
            "labels": np.argmax(probabilities, axis=-1).astype(np.uint8)}


def tissue_mixture(values: np.ndarray, iterations: int = MIXTURE_ITERATIONS):
    """Three-class 1-D Gaussian mixture by EM: ``(means, stds, weights)``, means sorted."""
    values = np.asarray(values, np.float64)
    if values.size < 30 or not np.all(np.isfinite(values)):
        raise ValueError(f"tissue mixture: need at least 30 finite brain intensities, got "
                         f"{values.size}")
    means = np.percentile(values, [15.0, 50.0, 85.0])
    stds = np.full(3, values.std() / 3.0 + 1e-6)
    weights = np.full(3, 1.0 / 3.0)
    for _ in range(iterations):
        posterior = _posteriors(values, means, stds, weights)
        total = posterior.sum(0) + 1e-12
        weights = total / values.size
        means = (posterior * values[:, None]).sum(0) / total
        stds = np.sqrt((posterior * (values[:, None] - means) ** 2).sum(0) / total) + 1e-6
    order = np.argsort(means)
    return means[order], stds[order], weights[order]


def _posteriors(values, means, stds, weights) -> np.ndarray:
    log = (np.log(weights) - np.log(stds)
           - 0.5 * ((values[:, None] - means) / stds) ** 2)
    log -= log.max(axis=1, keepdims=True)
    posterior = np.exp(log)
    return posterior / posterior.sum(axis=1, keepdims=True)


def template_from_t1(t1: np.ndarray, brain: np.ndarray | None = None) -> dict:
    """``{t1, probabilities, labels}`` of a skull-stripped T1 volume (any scale).

    ``brain`` defaults to the voxels above 1 % of the maximum. Intensities are scaled to
    [0, 1] by the 99.5th brain percentile; tissue maps are the mixture's posteriors
    (background outside the brain), labels their argmax (0 background, 1 CSF, 2 GM, 3 WM).
    """
    t1 = np.asarray(t1, np.float64)
    if t1.ndim != 3 or not np.all(np.isfinite(t1)):
        raise ValueError(f"T1 template: expected a finite 3-D volume, got shape {t1.shape}")
    if brain is None:
        brain = t1 > 0.01 * t1.max()
    brain = np.asarray(brain, bool)
    scale = np.percentile(t1[brain], 99.5) if brain.any() else 0.0
    if scale <= 0:
        raise ValueError("T1 template: no positive brain intensities")
    t1 = np.clip(t1 / scale, 0.0, 1.0) * brain
    means, stds, weights = tissue_mixture(t1[brain])
    probabilities = np.zeros(t1.shape + (4,))
    probabilities[..., 0] = ~brain
    probabilities[brain, 1:] = _posteriors(t1[brain], means, stds, weights)
    return {"t1": t1.astype(np.float32), "probabilities": probabilities.astype(np.float32),
            "labels": np.argmax(probabilities, axis=-1).astype(np.uint8)}
