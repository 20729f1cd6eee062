"""(fixed, moving) pairs of scans as a ``tf.data`` pipeline, with RCN's pairing rules.

Pairs of one subset are all ordered pairs ``(i, j), i != j``; with ``paired`` they are
adjacent entries in both directions ``(0, 1), (1, 0), (2, 3), (3, 2), ...`` (an odd last
entry is unused); with an ``atlas`` in the config they are ``(atlas, scan)`` for every other
scan. For the training scheme ("1") every subset is its own stream and pairs are drawn from
the subsets with the scheme's fractions as probabilities; any other scheme (or a subset
name) enumerates all pairs of its subsets once, in order unless shuffled.

Scans are read from HDF5 one pair at a time (``tf.data.Dataset.from_generator``), so the
files are never loaded whole. Every element (after batching) is a dict:

- ``fixed``, ``moving``            ``[B, D, H, W, 1]`` float32 in [0, 1] (uint8 / 255)
- ``fixed_seg``, ``moving_seg``    ``[B, D, H, W, 1]`` float32 raw label values (0 if absent)
- ``fixed_point``, ``moving_point`` ``[B, 6, 3]`` float32 voxels, -1 where absent
- ``fixed_id``, ``moving_id``      ``[B]`` strings "prefix/id" (unless ``with_ids=False``)
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from .augment import augment_pair
from .errors import DataError
from .dataset_config import TRAINING_SCHEME, DatasetConfig
from .hdf5 import NUM_POINTS, ScanStore

# Above this many labels, augmentation warps segmentations by nearest neighbour instead of
# one mask per label (57 masks of 128^3 per sample would not fit in memory).
MAX_LABELS_FOR_MASK_WARP = 8
SIDES = ("fixed", "moving")


def _subset_pairs(config: DatasetConfig, scheme, paired: bool | None,
                  use_atlas: bool | None) -> dict[str, list[tuple[str, str]]]:
    paired = config.paired if paired is None else paired
    if use_atlas and config.atlas is None:
        raise DataError(f"{config.where}: use_atlas=True but the config has no 'atlas'")
    atlas = config.atlas if use_atlas in (None, True) else None
    by_subset = {}
    for subset in config.scheme_subsets(scheme):
        pairs = config.subset_pairs(subset, paired, atlas)
        if not pairs:
            raise DataError(f"{config.where}: subsets['{subset}'] gives no pairs "
                            f"({len(config.subsets[subset])} scans, paired={paired}, "
                            f"atlas={atlas})")
        by_subset[subset] = pairs
    return by_subset


def list_pairs(config: DatasetConfig, scheme, paired: bool | None = None,
               use_atlas: bool | None = None) -> list[tuple[str, str]]:
    """All (fixed id, moving id) pairs of a scheme or subset, in a fixed order.

    ``paired`` defaults to the config's; ``use_atlas`` defaults to using the config's
    ``atlas`` when it has one.
    """
    by_subset = _subset_pairs(config, scheme, paired, use_atlas)
    return [pair for pairs in by_subset.values() for pair in pairs]


def _scan_arrays(scan: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(volume uint8, segmentation float32 or zeros, point float32 or -1) of a scan."""
    volume = scan["volume"]
    if "segmentation" in scan:
        segmentation = scan["segmentation"].astype(np.float32)
    else:
        segmentation = np.zeros(volume.shape, np.float32)
    point = scan.get("point")
    point = (np.full((NUM_POINTS, 3), -1.0, np.float32) if point is None
             else point.astype(np.float32))
    return volume, segmentation, point


def _raw_pair(store: ScanStore, fixed_id: str, moving_id: str) -> dict:
    sample = {}
    for side, entry in zip(SIDES, (fixed_id, moving_id)):
        volume, segmentation, point = _scan_arrays(store.read(entry))
        sample[side] = volume
        sample[f"{side}_seg"] = segmentation
        sample[f"{side}_point"] = point
        sample[f"{side}_id"] = entry
    return sample


def load_pair(config: DatasetConfig, fixed_id: str, moving_id: str,
              store: ScanStore | None = None) -> dict:
    """One pair as numpy arrays, same keys and scaling as :func:`pair_dataset`, no batch axis.

    Pass an open :class:`ScanStore` to reuse file handles across calls.
    """
    if store is None:
        with ScanStore(config) as own_store:
            return load_pair(config, fixed_id, moving_id, own_store)
    raw = _raw_pair(store, fixed_id, moving_id)
    pair = {}
    for side in SIDES:
        pair[side] = (raw[side].astype(np.float32) / np.float32(255.0))[..., None]
        pair[f"{side}_seg"] = raw[f"{side}_seg"][..., None]
    for side in SIDES:
        pair[f"{side}_point"] = raw[f"{side}_point"]
    for side in SIDES:
        pair[f"{side}_id"] = raw[f"{side}_id"]
    return pair


class _PairSource:
    """Generator factory for ``from_generator``: one pass over ``pairs`` per call.

    Each call is a new epoch with its own permutation (seeded by ``seed`` and the epoch
    number), so repeated iteration reshuffles deterministically.
    """

    def __init__(self, config: DatasetConfig, pairs, shuffle: bool, seed: tuple):
        self.config, self.pairs, self.shuffle, self.seed = config, pairs, shuffle, seed
        self.epoch = 0

    def __call__(self):
        order = np.arange(len(self.pairs))
        if self.shuffle:
            np.random.default_rng([*self.seed, self.epoch]).shuffle(order)
        self.epoch += 1
        with ScanStore(self.config) as store:
            for index in order:
                yield _raw_pair(store, *self.pairs[index])


def _signature(image_size) -> dict:
    size = tuple(image_size)
    signature = {}
    for side in SIDES:
        signature[side] = tf.TensorSpec(size, tf.uint8)
        signature[f"{side}_seg"] = tf.TensorSpec(size, tf.float32)
        signature[f"{side}_point"] = tf.TensorSpec((NUM_POINTS, 3), tf.float32)
        signature[f"{side}_id"] = tf.TensorSpec((), tf.string)
    return signature


def _source_dataset(config: DatasetConfig, pairs, shuffle: bool, seed: tuple,
                    repeat: bool) -> tf.data.Dataset:
    dataset = tf.data.Dataset.from_generator(
        _PairSource(config, pairs, shuffle, seed),
        output_signature=_signature(config.image_size))
    return dataset.repeat() if repeat else dataset


def _to_model_inputs(batch: dict, with_ids: bool) -> dict:
    result = {}
    for side in SIDES:
        result[side] = tf.cast(batch[side], tf.float32)[..., None] / 255.0
    for side in SIDES:
        result[f"{side}_seg"] = batch[f"{side}_seg"][..., None]
    for side in SIDES:
        result[f"{side}_point"] = batch[f"{side}_point"]
    if with_ids:
        for side in SIDES:
            result[f"{side}_id"] = batch[f"{side}_id"]
    return result


def pair_dataset(config: DatasetConfig, scheme, batch_size: int, shuffle: bool = True,
                 seed: int = 0, augment: bool = False, paired: bool | None = None,
                 repeat: bool = False, with_ids: bool = True,
                 use_atlas: bool | None = None,
                 drop_remainder: bool = False, attach=None,
                 augment_field: str = "bspline") -> tf.data.Dataset:
    """Batched (fixed, moving) pairs of ``scheme``; see the module docstring for elements.

    Args:
      config: from :func:`aldk_tf.data.load_dataset_config`.
      scheme: "1" (training: subsets mixed by their fractions), "2", a named scheme such as
        "test", or a subset name (those enumerate every pair).
      batch_size: pairs per element.
      shuffle: shuffle pairs (a new, seeded order every pass).
      seed: seeds shuffling, subset mixing and augmentation.
      augment: apply :func:`aldk_tf.data.augment.augment_pair` to the moving side (meant
        for training only).
      paired: adjacent-pair mode; defaults to the config's ``paired``.
      repeat: loop forever (each subset stream separately, so fractions hold).
      with_ids: include ``fixed_id`` / ``moving_id``.
      use_atlas: pair every scan with the config's atlas; defaults to True when it has one.
      drop_remainder: drop a last incomplete batch.
      augment_field: the augmentation's field, "bspline" (the release's) or "spline"
        (the natural spline through the control values: about 2.5 times stronger).
      attach: a function of a batch returning it with more entries, applied before the
        augmentation (training adds each pair's stored ``teacher_flow`` this way; the
        augmentation then maps that flow onto the deformed pair, see
        :func:`aldk_tf.data.augment.augmented_target`).
    """
    config.validate(scheme)                    # metadata only: fails early, reads no voxels
    by_subset = _subset_pairs(config, scheme, paired, use_atlas)
    if str(scheme) == TRAINING_SCHEME:
        fractions = config.scheme_subsets(scheme)
        streams = [(_source_dataset(config, pairs, shuffle, (seed, index), repeat),
                    float(fractions[subset]))
                   for index, (subset, pairs) in enumerate(by_subset.items())
                   if fractions[subset] > 0]
        datasets, weights = zip(*streams)
        if len(datasets) == 1:
            dataset = datasets[0]
        else:
            total = sum(weights)
            dataset = tf.data.Dataset.sample_from_datasets(
                list(datasets), weights=[w / total for w in weights], seed=seed)
    else:
        pairs = [pair for subset_pairs in by_subset.values() for pair in subset_pairs]
        dataset = _source_dataset(config, pairs, shuffle, (seed,), repeat)
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    dataset = dataset.map(lambda batch: _to_model_inputs(batch, with_ids))
    if attach is not None:
        dataset = dataset.map(attach)
    if augment:
        generator = tf.random.Generator.from_seed(seed)
        labels = config.label_values
        if labels is not None and len(labels) > MAX_LABELS_FOR_MASK_WARP:
            labels = None
        dataset = dataset.map(lambda batch: augment_pair(batch, generator, labels,
                                                         interpolation=augment_field))
    return dataset.prefetch(tf.data.AUTOTUNE)
