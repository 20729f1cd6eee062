"""Register every pair of a scheme or subset and report the RCN evaluation metrics.

:func:`evaluate_pairs` is shared by ``evaluate.py`` and the demo, so both print the same
numbers. Warping and metrics are the library's (:mod:`aldk_tf.metrics`); this module only
batches pairs and times the model. The reports it feeds: :mod:`aldk_tf.reports`.
TensorFlow is imported by the functions that run a model, not with the module, so that
the command lines check their arguments (:func:`check_image_size`) before loading it.
"""

from __future__ import annotations

import time
import warnings

import numpy as np

from aldk_tf.data import ScanStore
from aldk_tf.refine_options import DEFAULT_LEARNING_RATE
from aldk_tf.reports import BEFORE_KEYS, LABEL_KEYS, EvaluationError, summarise


def label_names(dataset_config, label_values) -> list[str]:
    """A name per evaluated label: the config's class names (joined when they share a
    value), the value itself when unnamed, or ``"mask"`` for a binary segmentation."""
    if label_values is None:
        return ["mask"]
    by_value: dict[int, list[str]] = {}
    for name, value in (dataset_config.segmentation_class_value or {}).items():
        by_value.setdefault(value, []).append(name)
    return ["+".join(by_value.get(value, [str(value)])) for value in label_values]


def check_image_size(model_size, dataset_config, grid: int = 1) -> None:
    """:class:`EvaluationError` unless the model was built for the dataset's volumes
    (``model_size``: the model's size times ``grid`` when it is run on a finer grid)."""
    if tuple(model_size) != tuple(dataset_config.image_size):
        takes = "takes" if grid == 1 else f"on a {grid}x finer grid takes"
        raise EvaluationError(
            f"size mismatch: the model {takes} {tuple(model_size)} volumes but "
            f"{dataset_config.where} has image_size {tuple(dataset_config.image_size)}")


def _flow_function(model, refine: int = 0,
                   refine_learning_rate: float = DEFAULT_LEARNING_RATE):
    """``flow(fixed, moving) -> [B, D, H, W, 3]`` numpy for a Keras model or a callable,
    refined by ``refine`` instance-optimisation steps from the model's flow when > 0."""
    import keras

    from aldk_tf.training.refine import refine_flow

    if isinstance(model, keras.Model):
        from aldk_tf.deploy.serving import RegistrationModule   # one trace, dynamic batch
        register = RegistrationModule(model).register
    else:
        register = model

    def model_flow(fixed, moving):
        return np.asarray(register(fixed, moving)["flow"])

    if refine == 0:
        return model_flow

    def refined_flow(fixed, moving):
        flow, _ = refine_flow(fixed, moving, model_flow(fixed, moving), refine,
                              learning_rate=refine_learning_rate)
        return flow.numpy()
    return refined_flow


def finer_grid_model(model, factor: int, refine: int = 0,
                     refine_learning_rate: float = DEFAULT_LEARNING_RATE):
    """A callable ``(fixed, moving) -> {"flow"}`` on a grid ``factor`` times finer than
    ``model``'s: the model registers the pair downsampled by ``factor`` (block means), its
    flow is upsampled to the fine grid (trilinear, displacements scaled by ``factor``) and
    then refined there by ``refine`` instance-optimisation steps (warm-started from it).
    For :func:`evaluate_pairs` on data prepared at ``factor`` x the model's size."""
    from aldk_tf import spatial
    from aldk_tf.training.refine import refine_flow

    model_flow = _flow_function(model)
    factor = int(factor)
    if factor < 1:
        raise EvaluationError(f"refinement grid factor: expected an integer >= 1, got "
                              f"{factor}")

    def register(fixed, moving):
        low = [spatial.downsample(np.asarray(v, np.float32), factor).numpy()
               if factor > 1 else v for v in (fixed, moving)]
        flow = model_flow(*low)
        if factor > 1:
            flow = spatial.upsample_flow(flow, factor)
        if refine:
            flow, _ = refine_flow(fixed, moving, flow, refine,
                                  learning_rate=refine_learning_rate)
        return {"flow": np.asarray(flow)}

    return register


def _batches(items, size):
    for start in range(0, len(items), size):
        yield items[start:start + size]


def scan_affine(store, entry: str):
    """A scan's voxel -> world (mm) ``affine`` attribute (written by the data
    preparation), or None when the scan has none."""
    group, _, _ = store.group(entry)
    affine = group.attrs.get("affine")
    if affine is None or np.shape(affine) != (4, 4):
        return None
    return np.asarray(affine, np.float64)


def scan_spacing(store, entry: str):
    """Voxel size in mm along each array axis of a scan (None without an affine)."""
    affine = scan_affine(store, entry)
    return None if affine is None else np.linalg.norm(affine[:3, :3], axis=0)


def evaluate_pairs(model, dataset_config, pairs, batch: int = 1, label_values=None,
                   progress: bool = True, *, refine: int = 0,
                   refine_learning_rate: float = DEFAULT_LEARNING_RATE,
                   surface: bool = False, before: bool = False
                   ) -> tuple[list[dict], dict]:
    """Register ``pairs`` and compute the evaluation metrics of each.

    Args:
      model: a registration model (``RecursiveCascade`` or any Keras model taking
        ``{"fixed", "moving"}`` and returning ``"flow"``), or a callable
        ``(fixed, moving) -> {"flow": ...}`` (e.g. a TFLite runner).
      dataset_config: the :class:`aldk_tf.data.DatasetConfig` the pairs come from.
      pairs: ``[(fixed id, moving id), ...]`` (e.g. :func:`aldk_tf.data.list_pairs`).
      batch: pairs registered per model call.
      label_values: the segmentation label values to score (the config's
        ``label_values``), or None for a binary 0/255 mask.
      progress: show a progress bar.
      refine: instance-optimisation steps (:func:`aldk_tf.training.refine.refine_flow`) from the
        model's flow before scoring; 0 scores the model's flow itself.
      refine_learning_rate: the refinement's Adam step size in voxels.
      surface: also HD95 and mean surface distance per label (:mod:`aldk_tf.metrics`),
        in mm when the fixed scan has an ``affine`` attribute, else in voxels
        (``distance_unit`` of the record).
      before: also score the identity flow (``record["before"]``: Dice, Jaccard,
        landmark distance and, with ``surface``, the distances before registration).
    Records also hold ``landmark_distance_mm`` (TRE in mm, through the moving scan's
    ``affine``) when every moving scan of the batch has an affine attribute.
    Returns:
      ``(records, summary)``: one dict per pair (``fixed_id``, ``moving_id``, ``dice``,
      ``jacc``, ``landmark_distance``, ``jacobian_det_std``, ``folding_percent``,
      ``dice_labels`` / ``jacc_labels`` {label name: value}, ``seconds`` = wall-clock
      model time per pair on this machine, refinement included, warm-up excluded), and
      :func:`summarise`.
    """
    import keras

    from aldk_tf import metrics
    from aldk_tf.data import load_pair

    if batch < 1:
        raise EvaluationError(f"--batch must be >= 1, got {batch}")
    if refine < 0:
        raise EvaluationError(f"--refine must be >= 0, got {refine}")
    if refine and not refine_learning_rate > 0:
        raise EvaluationError(f"--refine-lr must be > 0, got {refine_learning_rate}")
    if not pairs:
        raise EvaluationError(f"{dataset_config.where}: no pairs to evaluate")
    names = label_names(dataset_config, label_values)
    flow_of = _flow_function(model, refine, refine_learning_rate)
    bar = keras.utils.Progbar(len(pairs), unit_name="pair") if progress else None
    records: list[dict] = []
    warmed_up = False
    with ScanStore(dataset_config) as store:
        for chunk in _batches(list(pairs), batch):
            samples = [load_pair(dataset_config, fixed_id, moving_id, store)
                       for fixed_id, moving_id in chunk]
            stacked = {key: np.stack([sample[key] for sample in samples])
                       for key in samples[0] if not key.endswith("_id")}
            if not warmed_up:                       # tracing is not registration time
                flow_of(stacked["fixed"], stacked["moving"])
                warmed_up = True
            start = time.perf_counter()
            flow = flow_of(stacked["fixed"], stacked["moving"])
            seconds = (time.perf_counter() - start) / len(chunk)
            spacing, unit = None, None
            if surface:
                spacings = [scan_spacing(store, fixed_id) for fixed_id, _ in chunk]
                unit = "mm" if all(item is not None for item in spacings) else "voxel"
                spacing = (np.stack(spacings) if unit == "mm"
                           else np.ones((len(chunk), 3)))
            arguments = (stacked["fixed_seg"], stacked["moving_seg"])
            points = (stacked["fixed_point"], stacked["moving_point"])
            affines = [scan_affine(store, moving_id) for _, moving_id in chunk]
            options = {"surface_spacing": spacing, "moving_affines": (
                np.stack(affines) if all(a is not None for a in affines) else None)}
            result = metrics.pair_metrics(*arguments, flow, label_values, *points,
                                          **options)
            identity = (metrics.pair_metrics(*arguments, np.zeros_like(flow), label_values,
                                             *points, **options)
                        if before else None)
            for index, (fixed_id, moving_id) in enumerate(chunk):
                record = _record(fixed_id, moving_id, result, index, names, seconds)
                if unit is not None:
                    record["distance_unit"] = unit
                if identity is not None:
                    record["before"] = _before_record(identity, index, names)
                records.append(record)
            if bar is not None:
                bar.add(len(chunk), values=[("dice", _nanmean(result["dice"]))])
    return records, summarise(records)


def _record(fixed_id, moving_id, result, index, names, seconds) -> dict:
    record = {"fixed_id": str(fixed_id), "moving_id": str(moving_id)}
    for key in ("dice", "jacc", "landmark_distance", "jacobian_det_std",
                "folding_percent"):
        record[key] = float(result[key][index])
    for key in ("hd95", "msd", "landmark_distance_mm"):
        if key in result:
            record[key] = float(result[key][index])
    for key in LABEL_KEYS:
        if key in result:
            record[key] = {name: float(value) for name, value in
                           zip(names, result[key][index])}
    record["seconds"] = float(seconds)
    return record


def _before_record(result, index, names) -> dict:
    """The identity flow's scores of one pair (``record["before"]``)."""
    before = {key: float(result[key][index]) for key in BEFORE_KEYS if key in result}
    for key in LABEL_KEYS:
        if key in result:
            before[key] = {name: float(value) for name, value in
                           zip(names, result[key][index])}
    return before


def _nanmean(values) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)      # all-NaN: no segmentation
        return float(np.nanmean(values))
