"""The RCN release layout: scans in HDF5 files, described by a JSON configuration.

HDF5 (one file per dataset): one group per scan id (an id with slashes, such as
``hepaticvessel/1``, is a nested group) holding

- ``volume``        uint8 ``[D, H, W]``, intensities 0..255;
- ``segmentation``  optional, integer ``[D, H, W]`` (liver: 0/255 mask; brain: label values;
  written as uint8, or uint16 when a value exceeds 255, e.g. FreeSurfer ``aparc+aseg``);
- ``point``         optional, ``[6, 3]`` landmarks in voxels (array-axis order), rows of -1
  where a landmark is absent;
- group attributes  optional metadata (``affine``, crop box, source file, ...).

JSON: ``files`` {prefix: {"type": "HDF5", "path": ...}}, ``subsets`` {name: ["prefix/id",
...]}, ``schemes`` {"1": {subset: fraction} (training), "2": {...} (validation), named
evaluation sets}, ``image_size``, ``image_type``, optional ``segmentation_class_value``
{name: value}, ``atlas`` ("prefix/id"), ``paired`` and ``preprocessing`` (the settings of
``aldk-prep``, see :class:`aldk_tf.data.preprocess.PreprocessSettings`). An entry whose
prefix is not a key of ``files`` is looked up, whole, in the file registered under the
prefix ``"/"``.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import h5py
import numpy as np

from .errors import DataError

TRAINING_SCHEME = "1"
VALIDATION_SCHEME = "2"
NUM_POINTS = 6
MAX_LABEL = 65535                    # segmentations are uint8, or uint16 above 255
DEFAULT_IMAGE_SIZE = (128, 128, 128)
SCAN_KEYS = ("volume", "segmentation", "point", "attrs")
_HDF5_TYPES = ("hdf5", "h5")
_CONFIG_KEYS = ("files", "subsets", "schemes", "image_size", "image_type",
                "segmentation_class_value", "atlas", "paired")


# ----------------------------------------------------------------------------- output
def _temporary_path(path: Path) -> Path:
    """A fresh name beside ``path`` (same file system, so ``os.replace`` is atomic)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def write_text_atomic(path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary_path(path)
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


class DatasetWriter:
    """Write scans into a new HDF5 file that appears only when all of them are written.

    ::

        with DatasetWriter("datasets/brain.h5") as writer:
            writer.add("S01", volume=volume, segmentation=labels, attrs={"affine": a})

    On an exception inside the ``with`` block the temporary file is removed and any
    existing file at the destination is left untouched.
    """

    def __init__(self, path, compression: str | None = None):
        self.path = Path(path)
        self.compression = compression
        self._temporary: Path | None = None
        self._file: h5py.File | None = None
        self._shape: tuple | None = None
        self._first_id: str | None = None
        self.ids: list[str] = []

    def __enter__(self) -> "DatasetWriter":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._temporary = _temporary_path(self.path)
        self._file = h5py.File(self._temporary, "w")
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self._file.close()
        try:
            if exc_type is None:
                os.replace(self._temporary, self.path)
        finally:
            self._temporary.unlink(missing_ok=True)

    def add(self, scan_id: str, volume, segmentation=None, point=None,
            attrs: Mapping | None = None) -> None:
        """Add one scan; see the module docstring for the arrays' layout."""
        where = f"{self.path}: scan '{scan_id}'"
        if not scan_id or scan_id.startswith("/") or scan_id in self.ids:
            raise DataError(f"{where}: scan ids must be unique, non-empty and relative")
        volume = np.asarray(volume)
        if volume.dtype != np.uint8:
            raise DataError(f"{where}: 'volume' has dtype {volume.dtype}, expected uint8")
        if volume.ndim != 3:
            raise DataError(f"{where}: 'volume' has shape {volume.shape}, expected 3-D")
        if self._shape is None:
            self._shape, self._first_id = volume.shape, scan_id
        elif volume.shape != self._shape:
            raise DataError(
                f"{where}: 'volume' has shape {volume.shape} but scan '{self._first_id}' "
                f"has {self._shape}; all scans of a set must have the same size")
        group = self._file.create_group(scan_id)
        group.create_dataset("volume", data=volume, compression=self.compression)
        if segmentation is not None:
            group.create_dataset("segmentation", data=_segmentation_labels(segmentation,
                                                                          volume, where),
                                 compression=self.compression)
        if point is not None:
            point = np.asarray(point)
            if not np.issubdtype(point.dtype, np.number) or point.shape != (NUM_POINTS, 3):
                raise DataError(f"{where}: 'point' has shape {point.shape} and dtype "
                                f"{point.dtype}, expected numbers of shape ({NUM_POINTS}, 3)")
            group.create_dataset("point", data=point)
        for name, value in (attrs or {}).items():
            if value is None:
                continue
            try:
                group.attrs[name] = value
            except (TypeError, ValueError) as exc:
                raise DataError(f"{where}: attribute '{name}' cannot be stored ({exc})") \
                    from None
        self.ids.append(scan_id)


def _segmentation_labels(segmentation, volume: np.ndarray, where: str) -> np.ndarray:
    """Integer labels as uint8 when they fit (the original layout), else uint16."""
    segmentation = np.asarray(segmentation)
    if not (np.issubdtype(segmentation.dtype, np.integer) or segmentation.dtype == bool):
        raise DataError(f"{where}: 'segmentation' has dtype {segmentation.dtype}, "
                        "expected integer labels")
    if segmentation.shape != volume.shape:
        raise DataError(f"{where}: 'segmentation' has shape {segmentation.shape}, expected "
                        f"the volume's {volume.shape}")
    if segmentation.size and (segmentation.min() < 0 or segmentation.max() > MAX_LABEL):
        raise DataError(f"{where}: 'segmentation' values must lie in 0..{MAX_LABEL} to be "
                        "stored as uint8/uint16")
    fits_uint8 = not segmentation.size or segmentation.max() <= 255
    return segmentation.astype(np.uint8 if fits_uint8 else np.uint16)


def write_dataset(h5_path, scans: Mapping[str, Mapping] | Iterable[tuple[str, Mapping]],
                  compression: str | None = None) -> Path:
    """Write ``{scan id: {volume=, segmentation=, point=, attrs=}}`` atomically.

    ``scans`` may also be an iterable of ``(id, scan)`` pairs (e.g. a generator), so scans
    need not all be in memory at once. Returns the written path.
    """
    items = scans.items() if isinstance(scans, Mapping) else scans
    with DatasetWriter(h5_path, compression=compression) as writer:
        for scan_id, scan in items:
            unknown = set(scan) - set(SCAN_KEYS)
            if unknown:
                raise DataError(f"{h5_path}: scan '{scan_id}': unknown keys "
                                f"{sorted(unknown)} (expected {list(SCAN_KEYS)})")
            if "volume" not in scan:
                raise DataError(f"{h5_path}: scan '{scan_id}' has no 'volume'")
            writer.add(scan_id, **scan)
    return Path(h5_path)


# ----------------------------------------------------------------------------- reading
def open_hdf5(path) -> h5py.File:
    """Open an HDF5 file read-only, with a :class:`DataError` naming it on failure."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        reason = " ".join(str(exc).split())
        raise DataError(f"{path}: not a readable HDF5 file ({reason})") from None


def _member(group: h5py.Group, name: str, h5_path, key: str,
            required: bool) -> h5py.Dataset | None:
    item = group.get(name)
    if item is None:
        if required:
            raise DataError(f"{h5_path}: group '{key}' has no dataset '{name}'")
        return None
    if not isinstance(item, h5py.Dataset):
        raise DataError(f"{h5_path}: '{key}/{name}' is a group, expected a dataset")
    return item


def check_scan(group: h5py.Group, h5_path, key: str, image_size=None) -> None:
    """Check a scan group's datasets (names, dtypes, shapes) without reading voxels."""
    volume = _member(group, "volume", h5_path, key, required=True)
    if volume.dtype != np.uint8:
        raise DataError(f"{h5_path}: '{key}/volume' has dtype {volume.dtype}, "
                        "expected uint8")
    if volume.ndim != 3:
        raise DataError(f"{h5_path}: '{key}/volume' has shape {volume.shape}, "
                        "expected 3-D [D, H, W]")
    if image_size is not None and tuple(volume.shape) != tuple(image_size):
        raise DataError(f"{h5_path}: '{key}/volume' has shape {volume.shape} but the "
                        f"dataset's image_size is {tuple(image_size)}")
    segmentation = _member(group, "segmentation", h5_path, key, required=False)
    if segmentation is not None:
        if not (np.issubdtype(segmentation.dtype, np.integer) or
                segmentation.dtype == bool):
            raise DataError(f"{h5_path}: '{key}/segmentation' has dtype "
                            f"{segmentation.dtype}, expected integer labels")
        if segmentation.shape != volume.shape:
            raise DataError(f"{h5_path}: '{key}/segmentation' has shape "
                            f"{segmentation.shape}, expected the volume's {volume.shape}")
    point = _member(group, "point", h5_path, key, required=False)
    if point is not None and (point.shape != (NUM_POINTS, 3) or
                              not np.issubdtype(point.dtype, np.number)):
        raise DataError(f"{h5_path}: '{key}/point' has shape {point.shape} and dtype "
                        f"{point.dtype}, expected numbers of shape ({NUM_POINTS}, 3)")


def read_scan(group: h5py.Group, h5_path, key: str, image_size=None) -> dict:
    """``{volume, [segmentation], [point], attrs}`` of one scan group, as numpy arrays."""
    check_scan(group, h5_path, key, image_size)
    scan = {"volume": group["volume"][()]}
    for name in ("segmentation", "point"):
        if name in group:
            scan[name] = group[name][()]
    scan["attrs"] = dict(group.attrs)
    return scan


def list_scans(h5_path) -> list[str]:
    """Ids of all groups holding a ``volume`` (nested ids joined with '/'), sorted."""
    ids = []
    with open_hdf5(h5_path) as file:
        def visit(name, item):
            if isinstance(item, h5py.Group) and "volume" in item:
                ids.append(name)
        file.visititems(visit)
    return sorted(ids)


def read_dataset(h5_path) -> dict[str, dict]:
    """Every scan of one HDF5 file (loads everything: for small files and tests)."""
    scans = {}
    with open_hdf5(h5_path) as file:
        for key in list_scans(h5_path):
            scans[key] = read_scan(file[key], h5_path, key)
    return scans


# ----------------------------------------------------------------------------- config
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

    def validate(self, scheme=None, check_labels: bool = False) -> list[str]:
        """Check every scan of ``scheme`` (all subsets when None) in the HDF5 files.

        Always: file present and readable, group and ``volume`` present, dtypes, shapes
        (``volume`` must equal ``image_size``). With ``check_labels`` also read the
        segmentations and require each ``segmentation_class_value`` to occur in at least
        one of them (skipped when none of the scans has a segmentation). Returns the ids.
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
                if check_labels and self.label_values and "segmentation" in group:
                    with_segmentation += 1
                    present.update(np.unique(group["segmentation"][()]).tolist())
        if check_labels and self.label_values and with_segmentation:
            missing = {name: value for name, value in self.segmentation_class_value.items()
                       if value not in present}
            if missing:
                raise DataError(
                    f"{self.where}: segmentation_class_value {missing} absent from every "
                    f"segmentation of {'all subsets' if scheme is None else repr(scheme)} "
                    f"({with_segmentation} scans)")
        return ids

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
        write_text_atomic(path, json.dumps(self.to_json(), indent=2) + "\n")
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


class ScanStore:
    """Read scans of a :class:`DatasetConfig` by "prefix/id".

    Each HDF5 file is opened once, on first use, and only the requested datasets are
    read, so large files stream scan by scan. Use as a context manager (or ``close()``).
    """

    def __init__(self, config: DatasetConfig):
        self.config = config
        self._files: dict[str, tuple[h5py.File, Path]] = {}

    def __enter__(self) -> "ScanStore":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        for file, _ in self._files.values():
            file.close()
        self._files.clear()

    def group(self, entry: str) -> tuple[h5py.Group, Path, str]:
        """(group, HDF5 path, key) of an entry; :class:`DataError` if absent."""
        prefix, key = self.config.split_entry(entry)
        if prefix not in self._files:
            h5_path = self.config.resolve_file(prefix)
            self._files[prefix] = (open_hdf5(h5_path), h5_path)
        file, h5_path = self._files[prefix]
        group = file.get(key)
        if not isinstance(group, h5py.Group):
            raise DataError(f"{h5_path}: no group '{key}' (entry '{entry}' of "
                            f"{self.config.where})")
        return group, h5_path, key

    def read(self, entry: str) -> dict:
        """``{volume, [segmentation], [point], attrs}`` of one entry, checked."""
        group, h5_path, key = self.group(entry)
        return read_scan(group, h5_path, key, self.config.image_size)
