"""Evaluation metrics (RCN evaluation format plus current practice).

Segmentations are compared as boolean masks, one per label: a binary 0/255 mask
(liver; ``label_values=None``, threshold > 128) or one mask per value listed in the
dataset's ``segmentation_class_value`` (brain). The moving segmentation is warped by
:func:`aldk_tf.spatial.warp_labels` (rule ``"threshold"``: per-label masks x 255 warped
trilinearly, thresholded at 128, like the original evaluation; the SavedModel's
``warp_segmentation`` signature calls the same function).

Surface distances (:func:`surface_distances`): the surface of a mask is its voxels with a
6-neighbour outside the mask (or outside the volume); distances between surfaces are
Euclidean in mm (voxel spacing), from ``scipy.ndimage.distance_transform_edt``. HD95 is
the larger of the two directed 95th percentiles (A's surface to B's and B's to A's), the
mean surface distance the mean over both directed sets together (average symmetric
surface distance). Both are NaN when either mask is empty.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf
from scipy import ndimage

from aldk_tf import spatial

MASK_THRESHOLD = spatial.MASK_THRESHOLD


def segmentation_masks(segmentation, label_values=None) -> np.ndarray:
    """``[B, D, H, W, 1]`` label map -> boolean masks ``[B, D, H, W, L]``."""
    segmentation = np.asarray(segmentation)
    if label_values is None:
        return segmentation > MASK_THRESHOLD
    return np.concatenate([segmentation == value for value in label_values], axis=-1)


def warp_segmentation(segmentation, flow, label_values=None) -> np.ndarray:
    """Warp a label map by ``flow``; boolean masks ``[B, D, H, W, L]``.

    Without ``label_values`` the segmentation is a binary mask (> 128) warped as 0/255.
    """
    segmentation = np.asarray(segmentation, np.float32)
    if label_values is None:
        segmentation = np.where(segmentation > MASK_THRESHOLD, 255.0, 0.0).astype(np.float32)
    warped = spatial.warp_labels(segmentation, flow, "threshold", label_values)
    return segmentation_masks(warped.numpy(), label_values)


def dice(masks_a, masks_b) -> np.ndarray:
    """Per-sample, per-label Dice ``[B, L]``; NaN where a label is empty in both."""
    a, b = np.asarray(masks_a, bool), np.asarray(masks_b, bool)
    axes = (1, 2, 3)
    intersection = np.logical_and(a, b).sum(axis=axes)
    total = a.sum(axis=axes) + b.sum(axis=axes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 2.0 * intersection / total, np.nan)


def jaccard(masks_a, masks_b) -> np.ndarray:
    """Per-sample, per-label Jaccard ``[B, L]``; NaN where a label is empty in both."""
    a, b = np.asarray(masks_a, bool), np.asarray(masks_b, bool)
    axes = (1, 2, 3)
    intersection = np.logical_and(a, b).sum(axis=axes)
    union = np.logical_or(a, b).sum(axis=axes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, intersection / union, np.nan)


def surface(mask: np.ndarray) -> np.ndarray:
    """Boolean surface voxels of a 3-D mask (see the module docstring)."""
    mask = np.asarray(mask, bool)
    inner = ndimage.binary_erosion(mask, ndimage.generate_binary_structure(3, 1),
                                   border_value=0)
    return mask & ~inner


def surface_distances(mask_a, mask_b, spacing=(1.0, 1.0, 1.0)) -> tuple[float, float]:
    """``(HD95, mean surface distance)`` of two 3-D masks, in the units of ``spacing``."""
    surface_a, surface_b = surface(mask_a), surface(mask_b)
    if not surface_a.any() or not surface_b.any():
        return float("nan"), float("nan")
    # Distances between the surfaces only need the box around both (exact, faster).
    box = tuple(slice(start, stop) for start, stop in
                zip(*_bounds(surface_a | surface_b)))
    surface_a, surface_b = surface_a[box], surface_b[box]
    spacing = np.asarray(spacing, np.float64)
    to_b = ndimage.distance_transform_edt(~surface_b, sampling=spacing)[surface_a]
    to_a = ndimage.distance_transform_edt(~surface_a, sampling=spacing)[surface_b]
    hd95 = max(np.percentile(to_b, 95), np.percentile(to_a, 95))
    mean = np.concatenate([to_b, to_a]).mean()
    return float(hd95), float(mean)


def _bounds(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    indices = np.argwhere(mask)
    return indices.min(axis=0), indices.max(axis=0) + 1


def surface_metrics(masks_a, masks_b, spacing=None) -> dict[str, np.ndarray]:
    """Per-sample, per-label ``hd95`` and ``msd`` ``[B, L]`` of masks ``[B, D, H, W, L]``.

    ``spacing``: ``[B, 3]`` (or one ``[3]``) voxel sizes in mm; None = 1 (voxel units).
    """
    a, b = np.asarray(masks_a, bool), np.asarray(masks_b, bool)
    spacing = np.ones(3) if spacing is None else np.asarray(spacing, np.float64)
    spacing = np.broadcast_to(spacing, (a.shape[0], 3))
    hd95 = np.full((a.shape[0], a.shape[-1]), np.nan)
    msd = np.full_like(hd95, np.nan)
    for sample in range(a.shape[0]):
        for label in range(a.shape[-1]):
            hd95[sample, label], msd[sample, label] = surface_distances(
                a[sample, ..., label], b[sample, ..., label], spacing[sample])
    return {"hd95": hd95, "msd": msd}


def sample_flow(flow, points) -> np.ndarray:
    """Trilinear sample of one flow ``[D, H, W, 3]`` at voxel ``points`` ``[P, 3]``."""
    values = spatial.sample(tf.constant(flow, tf.float32)[None],
                            tf.constant(points, tf.float32)[None])
    return values.numpy()[0]


def landmark_distance(fixed_points, moving_points, flow,
                      moving_affines=None) -> np.ndarray:
    """Mean Euclidean distance between ``p + flow(p)`` and the moving landmark.

    A fixed landmark ``p`` corresponds to ``p + flow(p)`` in the moving image. Points with
    any coordinate < 0 (absent) in either image are skipped; NaN when none remain.
    Shapes: points ``[B, P, 3]``, flow ``[B, D, H, W, 3]``; returns ``[B]``. In voxels of
    the moving grid, or in mm with ``moving_affines`` ``[B, 4, 4]`` (moving voxel ->
    world; the target registration error, TRE).
    """
    fixed_points, moving_points = np.asarray(fixed_points), np.asarray(moving_points)
    flow = np.asarray(flow)
    distances = np.full(fixed_points.shape[0], np.nan)
    for b in range(fixed_points.shape[0]):
        valid = (fixed_points[b] >= 0).all(axis=1) & (moving_points[b] >= 0).all(axis=1)
        if valid.any():
            mapped = fixed_points[b, valid] + sample_flow(flow[b], fixed_points[b, valid])
            difference = mapped - moving_points[b, valid]                 # [P, 3] voxels
            if moving_affines is not None:
                difference = difference @ np.asarray(moving_affines[b])[:3, :3].T
            distances[b] = np.linalg.norm(difference, axis=1).mean()
    return distances


def jacobian_statistics(flow) -> dict[str, np.ndarray]:
    """Per-sample std of det(J(x + flow)) and the percentage of voxels with det <= 0."""
    determinant = spatial.jacobian_determinant(flow).numpy()
    flat = determinant.reshape(determinant.shape[0], -1)
    return {"jacobian_det_std": flat.std(axis=1),
            "folding_percent": 100.0 * (flat <= 0).mean(axis=1)}


def pair_metrics(fixed_seg, moving_seg, flow, label_values=None, fixed_points=None,
                 moving_points=None, surface_spacing=None,
                 moving_affines=None) -> dict[str, np.ndarray]:
    """Everything the evaluation reports for a batch of registered pairs.

    Returns per-sample arrays: ``dice`` and ``jacc`` (mean over labels), ``dice_labels``
    and ``jacc_labels`` (``[B, L]``), ``landmark_distance``, ``jacobian_det_std`` and
    ``folding_percent``; with ``surface_spacing`` (``[B, 3]`` mm, or ``False`` for none)
    also ``hd95_labels``, ``msd_labels`` (``[B, L]``) and their means ``hd95``, ``msd``;
    with ``moving_affines`` (``[B, 4, 4]``) also ``landmark_distance_mm`` (TRE in mm).
    """
    fixed_masks = segmentation_masks(fixed_seg, label_values)
    warped_masks = warp_segmentation(moving_seg, flow, label_values)
    dice_labels, jacc_labels = dice(fixed_masks, warped_masks), jaccard(fixed_masks,
                                                                        warped_masks)
    result = {"dice_labels": dice_labels, "jacc_labels": jacc_labels,
              "dice": _nanmean_rows(dice_labels), "jacc": _nanmean_rows(jacc_labels)}
    if surface_spacing is not None and surface_spacing is not False:
        distances = surface_metrics(fixed_masks, warped_masks, surface_spacing)
        for key, values in distances.items():
            result[f"{key}_labels"], result[key] = values, _nanmean_rows(values)
    if fixed_points is not None and moving_points is not None:
        result["landmark_distance"] = landmark_distance(fixed_points, moving_points, flow)
        if moving_affines is not None:
            result["landmark_distance_mm"] = landmark_distance(
                fixed_points, moving_points, flow, moving_affines)
    else:
        result["landmark_distance"] = np.full(len(dice_labels), np.nan)
    result.update(jacobian_statistics(flow))
    return result


def _nanmean_rows(values: np.ndarray) -> np.ndarray:
    counts = np.sum(~np.isnan(values), axis=1)
    sums = np.nansum(values, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
