"""A dataset's JSON configuration (RCN layout): files, subsets, schemes and the pairs' ids.

JSON: ``files`` {prefix: {"type": "HDF5", "path": ...}}, ``subsets`` {name: ["prefix/id",
...]}, ``schemes`` {"1": {subset: fraction} (training), "2": {...} (validation), named
evaluation sets}, ``image_size``, ``image_type``, optional ``segmentation_class_value``
{name: value}, ``atlas`` ("prefix/id"), ``paired`` and ``preprocessing`` (the settings of
``aldk-prep``, see :class:`aldk_tf.data.preprocess.PreprocessSettings`). An entry whose
prefix is not a key of ``files`` is looked up, whole, in the file registered under the
prefix ``"/"``. The HDF5 files themselves: :mod:`aldk_tf.data.hdf5`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import DataError
from aldk_tf.config import atomic_write_text

from .hdf5 import ScanStore, check_scan

TRAINING_SCHEME = "1"
VALIDATION_SCHEME = "2"
DEFAULT_IMAGE_SIZE = (128, 128, 128)
_HDF5_TYPES = ("hdf5", "h5")
_CONFIG_KEYS = ("files", "subsets", "schemes", "image_size", "image_type",
                "segmentation_class_value", "atlas", "paired")


@dataclass
class DatasetConfig:
    """A dataset's JSON configuration (RCN layout). See the module docstring.

    ``files`` is kept exactly as written in the JSON (paths unresolved); use
    :meth:`resolve_file`. ``path`` is the JSON file this came from (relative HDF5 paths are
    looked up beside it first, then in the current directory). Unknown JSON keys are kept
    in ``extra`` so a load/save round trip preserves them.
    """

    files: dict[str, dict]
    subsets: dict[str, list[str]]
    schemes: dict[str, dict[str, float]]
    image_size: tuple[int, int, int] = DEFAULT_IMAGE_SIZE
    image_type: str = ""
    segmentation_class_value: dict[str, int] | None = None
    atlas: str | None = None
    paired: bool = False
    path: Path | None = None
    extra: dict = field(default_factory=dict)

    @property
    def where(self) -> str:
        return str(self.path) if self.path is not None else "<dataset config>"

    @property
    def label_values(self) -> list[int] | None:
        """Sorted distinct values of ``segmentation_class_value``, or None."""
        if not self.segmentation_class_value:
            return None
        return sorted(set(self.segmentation_class_value.values()))

    @property
    def preprocessing(self):
        """How the data preparation made the scans (a
        :class:`aldk_tf.data.preprocess.PreprocessSettings`, from the JSON's
        ``"preprocessing"``), or None for data prepared otherwise."""
        raw = self.extra.get("preprocessing")
        if raw is None:
            return None
        from .preprocess import PreprocessSettings
        return PreprocessSettings.from_dict(raw, where=f"{self.where}: 'preprocessing'")

    # -- ids ------------------------------------------------------------------------
    def scheme_subsets(self, scheme) -> dict[str, float]:
        """``{subset: fraction}`` of a scheme ("1", "2", a named set) or of a subset name."""
        name = str(scheme)
        if name in self.schemes:
            return dict(self.schemes[name])
        if name in self.subsets:
            return {name: 1.0}
        raise DataError(f"{self.where}: unknown scheme or subset '{name}' (schemes: "
                        f"{sorted(self.schemes)}; subsets: {sorted(self.subsets)})")

    def scheme_ids(self, scheme) -> list[str]:
        """The "prefix/id" entries of a scheme or subset, in JSON order, without repeats."""
        ids = []
        for subset in self.scheme_subsets(scheme):
            ids.extend(self.subsets[subset])
        return list(dict.fromkeys(ids))

    def split_entry(self, entry: str) -> tuple[str, str]:
        """``"prefix/id"`` → (file prefix, key inside that file), as the original did."""
        cut = entry.find("/")
        if cut > 0 and entry[:cut] in self.files:
            return entry[:cut], entry[cut + 1:]
        if "/" in self.files:
            return "/", entry
        raise DataError(f"{self.where}: entry '{entry}' has no known file prefix "
                        f"(files: {sorted(self.files)})")

    def resolve_file(self, prefix: str) -> Path:
        """The absolute HDF5 path of ``files[prefix]``: beside the JSON first, then the cwd."""
        written = Path(self.files[prefix]["path"])
        candidates = [written] if written.is_absolute() else []
        if not written.is_absolute():
            if self.path is not None:
                candidates.append(self.path.parent / written)
            candidates.append(Path.cwd() / written)
        for candidate in candidates:
            if candidate.is_file():
                return candidate.absolute()
        tried = ", ".join(str(c) for c in dict.fromkeys(candidates))
        raise DataError(f"{self.where}: files['{prefix}'] path '{written}' not found "
                        f"(tried {tried})")

    def subset_pairs(self, subset: str, paired: bool | None = None,
                     atlas: str | None = None) -> list[tuple[str, str]]:
        """The (fixed, moving) entries of one subset by RCN's pairing rules (see
        :mod:`aldk_tf.data.pairs`): ``(atlas, scan)`` for every other scan with an atlas,
        adjacent entries both ways when ``paired`` (default: the config's), else every
        ordered pair of two different entries."""
        paired = self.paired if paired is None else paired
        entries = self.subsets[subset]
        if atlas is not None:
            return [(atlas, entry) for entry in entries if entry != atlas]
        if paired:
            pairs = []
            for first, second in zip(entries[0::2], entries[1::2]):
                pairs += [(first, second), (second, first)]
            return pairs
        return [(first, second) for i, first in enumerate(entries)
                for j, second in enumerate(entries) if i != j]

    def check_pairs(self, schemes=None) -> None:
        """:class:`DataError` naming the first subset of ``schemes`` (default: every
        scheme) that gives no pair: a subset of one scan (pairs are two different scans)
        is refused before a run starts, whether or not it validates."""
        for scheme in (self.schemes if schemes is None else schemes):
            for subset in self.scheme_subsets(scheme):
                if not self.subset_pairs(subset, atlas=self.atlas):
                    count = len(self.subsets[subset])
                    raise DataError(
                        f"{self.where}: subsets['{subset}'] (scheme '{scheme}') gives no "
                        f"pair ({count} scan{'s' if count != 1 else ''}"
                        f"{', paired' if self.paired else ''}); expected at least two "
                        "scans (pairs are two different scans)")

    # -- checks ---------------------------------------------------------------------
    def check_structure(self) -> None:
        """Check the configuration itself (no HDF5 access); raise :class:`DataError`."""
        where = self.where
        if not isinstance(self.files, dict) or not self.files:
            raise DataError(f"{where}: 'files' must be a non-empty object")
        for prefix, entry in self.files.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
                raise DataError(f"{where}: files['{prefix}'] needs a string 'path'")
            kind = str(entry.get("type", "HDF5")).lower()
            if kind not in _HDF5_TYPES:
                raise DataError(f"{where}: files['{prefix}'] has type '{entry['type']}', "
                                "only HDF5 is supported")
        if not isinstance(self.subsets, dict):
            raise DataError(f"{where}: 'subsets' must be an object")
        for name, entries in self.subsets.items():
            if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
                raise DataError(f"{where}: subsets['{name}'] must be a list of strings")
            if not entries:
                raise DataError(f"{where}: subsets['{name}'] is empty")
            repeated = sorted({e for e in entries if entries.count(e) > 1})
            if repeated:       # its pairs would hold that scan paired with itself
                raise DataError(f"{where}: subsets['{name}'] lists '{repeated[0]}' more "
                                "than once; a scan would be paired with itself")
            for entry in entries:
                self.split_entry(entry)
        if not isinstance(self.schemes, dict):
            raise DataError(f"{where}: 'schemes' must be an object")
        for name, fractions in self.schemes.items():
            if not isinstance(fractions, dict) or not fractions:
                raise DataError(f"{where}: schemes['{name}'] must be a non-empty object "
                                "{subset: fraction}")
            for subset, fraction in fractions.items():
                if subset not in self.subsets:
                    raise DataError(f"{where}: schemes['{name}'] refers to unknown subset "
                                    f"'{subset}' (subsets: {sorted(self.subsets)})")
                if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) \
                        or fraction < 0:
                    raise DataError(f"{where}: schemes['{name}']['{subset}'] must be a "
                                    f"number >= 0, got {fraction!r}")
            if sum(fractions.values()) <= 0:
                raise DataError(f"{where}: schemes['{name}'] fractions sum to 0")
        size = self.image_size
        if len(size) != 3 or not all(isinstance(n, int) and n > 0 for n in size):
            raise DataError(f"{where}: 'image_size' must be 3 positive integers, "
                            f"got {list(size)}")
        values = self.segmentation_class_value
        if values is not None and (not isinstance(values, dict) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in values.values())):
            raise DataError(f"{where}: 'segmentation_class_value' must map names to "
                            "integer label values")
        if self.atlas is not None:
            self.split_entry(self.atlas)

    def validate(self, scheme=None, check_labels: bool = False,
                 require_segmentation: bool = False) -> list[str]:
        """Check every scan of ``scheme`` (all subsets when None) in the HDF5 files.

        Always: file present and readable, group and ``volume`` present, dtypes, shapes
        (``volume`` must equal ``image_size``). With ``check_labels`` also read the
        segmentations: each ``segmentation_class_value`` must occur in at least one of
        them (with ``require_segmentation`` some scan must have one); without
        ``segmentation_class_value`` they are binary masks read as > 128, so some voxel
        must exceed 128. Returns the ids.
        """
        if scheme is None:
            ids = list(dict.fromkeys(e for entries in self.subsets.values() for e in entries))
        else:
            ids = self.scheme_ids(scheme)
        if self.atlas is not None and self.atlas not in ids:
            ids.append(self.atlas)
        present: set[int] = set()
        with_segmentation = 0
        with ScanStore(self) as store:
            for entry in ids:
                group, h5_path, key = store.group(entry)
                check_scan(group, h5_path, key, self.image_size)
                if check_labels and "segmentation" in group:
                    with_segmentation += 1
                    present.update(np.unique(group["segmentation"][()]).tolist())
        if check_labels:
            self._check_labels(present, with_segmentation,
                               'all subsets' if scheme is None else repr(scheme),
                               require_segmentation)
        return ids

    def _check_labels(self, present: set, with_segmentation: int, where: str,
                      require_segmentation: bool) -> None:
        """The label requests of :meth:`validate` against the values ``present``."""
        if self.label_values:
            if not with_segmentation and require_segmentation:
                raise DataError(
                    f"{self.where}: segmentation_class_value lists labels "
                    f"{self.label_values} but no scan of {where} has a segmentation; "
                    "expected segmentations to score them (or no segmentation_class_value)")
            missing = {name: value for name, value in self.segmentation_class_value.items()
                       if value not in present}
            if missing and with_segmentation:
                raise DataError(
                    f"{self.where}: segmentation_class_value {missing} absent from every "
                    f"segmentation of {where} ({with_segmentation} scans)")
        elif with_segmentation and max(present, default=0) <= 128:
            shown = ", ".join(str(v) for v in sorted(present)[:6])
            raise DataError(
                f"{self.where}: segmentations hold the values {shown} but there is no "
                "segmentation_class_value, so they are read as binary 0/255 masks (> 128) "
                "and every one is empty; list the labels in segmentation_class_value")

    # -- JSON -----------------------------------------------------------------------
    def to_json(self) -> dict:
        """The JSON object, keys in the original's order; ``paired`` only when true."""
        data = {"files": self.files, "subsets": self.subsets, "schemes": self.schemes,
                "image_size": list(self.image_size), "image_type": self.image_type}
        if self.segmentation_class_value is not None:
            data["segmentation_class_value"] = self.segmentation_class_value
        if self.atlas is not None:
            data["atlas"] = self.atlas
        if self.paired:
            data["paired"] = True
        data.update(self.extra)
        return data

    def save(self, json_path=None) -> Path:
        """Write the JSON atomically (to ``json_path`` or back to :attr:`path`)."""
        path = Path(json_path) if json_path is not None else self.path
        if path is None:
            raise DataError("<dataset config>: no path to save to")
        self.check_structure()
        self.check_pairs()                     # no subset a pair cannot come from
        atomic_write_text(str(path), json.dumps(self.to_json(), indent=2) + "\n")
        self.path = path
        return path


def load_dataset_config(path) -> DatasetConfig:
    """Read and check a dataset JSON (RCN layout). Raises :class:`DataError`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: invalid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}: expected a JSON object at the top level")
    for key in ("files", "subsets", "schemes"):
        if key not in raw:
            raise DataError(f"{path}: missing key '{key}'")
    size = raw.get("image_size", list(DEFAULT_IMAGE_SIZE))
    if not isinstance(size, list):
        raise DataError(f"{path}: 'image_size' must be a list of 3 integers, got {size!r}")
    paired = raw.get("paired", False)
    if not isinstance(paired, bool):
        raise DataError(f"{path}: 'paired' must be true or false, got {paired!r}")
    schemes = raw["schemes"]
    if isinstance(schemes, dict):
        schemes = {str(name): fractions for name, fractions in schemes.items()}
    config = DatasetConfig(
        files=raw["files"], subsets=raw["subsets"], schemes=schemes,
        image_size=tuple(size), image_type=str(raw.get("image_type", "")),
        segmentation_class_value=raw.get("segmentation_class_value"),
        atlas=raw.get("atlas"), paired=paired, path=path,
        extra={k: v for k, v in raw.items() if k not in _CONFIG_KEYS})
    config.check_structure()
    return config


def write_dataset_config(json_path, files: dict, subsets: dict, schemes: dict,
                         image_size, image_type: str = "",
                         segmentation_class_value: dict | None = None,
                         atlas: str | None = None, paired: bool = False,
                         **extra) -> DatasetConfig:
    """Check and atomically write a dataset JSON; returns the loaded-equivalent config."""
    config = DatasetConfig(
        files=files, subsets={k: list(v) for k, v in subsets.items()},
        schemes={str(k): dict(v) for k, v in schemes.items()},
        image_size=tuple(int(n) for n in image_size), image_type=image_type,
        segmentation_class_value=segmentation_class_value, atlas=atlas, paired=paired,
        path=Path(json_path), extra=extra)
    config.save()
    return config
