"""The RCN release layout's HDF5 files: writing, checking and reading scans.

HDF5 (one file per dataset): one group per scan id (an id with slashes, such as
``hepaticvessel/1``, is a nested group) holding

- ``volume``        uint8 ``[D, H, W]``, intensities 0..255;
- ``segmentation``  optional, integer ``[D, H, W]`` (liver: 0/255 mask; brain: label values;
  written as uint8, or uint16 when a value exceeds 255, e.g. FreeSurfer ``aparc+aseg``);
- ``point``         optional, ``[6, 3]`` landmarks in voxels (array-axis order), rows of -1
  where a landmark is absent;
- group attributes  optional metadata (``affine``, crop box, source file, ...).

The JSON configuration that lists the files, subsets and schemes:
:mod:`aldk_tf.data.dataset_config`.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Iterable, Mapping

import h5py
import numpy as np

from .errors import DataError

NUM_POINTS = 6
MAX_LABEL = 65535                    # segmentations are uint8, or uint16 above 255
SCAN_KEYS = ("volume", "segmentation", "point", "attrs")


# ----------------------------------------------------------------------------- output
def _temporary_path(path: Path) -> Path:
    """A fresh name beside ``path`` (same file system, so ``os.replace`` is atomic)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


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


# ----------------------------------------------------------------------------- scans by id
class ScanStore:
    """Read scans of a :class:`aldk_tf.data.dataset_config.DatasetConfig` by "prefix/id".

    The configuration is used through ``split_entry``, ``resolve_file``, ``where`` and
    ``image_size`` only (this module does not import it: the configuration imports the
    files' reader, not the reverse).

    Each HDF5 file is opened once, on first use, and only the requested datasets are
    read, so large files stream scan by scan. Use as a context manager (or ``close()``).
    """

    def __init__(self, config):
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
