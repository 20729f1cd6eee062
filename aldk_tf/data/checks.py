"""What makes a scan, a label map, a pair or a split meaningless: the shared checks.

Well-formed input can still give a result nobody should trust: a volume that is one slice
thick or has no voxel size, a blank or constant scan, a label map passed where an
intensity scan is expected (or the reverse), a scan registered to itself, a subset of one
scan (pairs are two different scans), a size no network takes, labels no scan has. Each
tool calls these checks where it first reads the data (the table: ``docs/faults.md``);
they raise :class:`DataError` (one line naming the file or flag and what was expected) or
return a warning for the tool to print. Numpy only: no TensorFlow.
"""

from __future__ import annotations

import os

import numpy as np

from .errors import DataError

#: Voxels along each axis below which a volume is a slice (or a few), not a 3-D scan.
MIN_EXTENT = 4
#: Every network's total stride: a size that is not a multiple of it is refused by all.
SIZE_MULTIPLE = 16
#: The cross-resolution student (``--crd``) runs at half the size: multiples of 32.
CRD_SIZE_MULTIPLE = 32
#: An "intensity scan" with at most this many distinct integer values is a label map.
MAX_LABEL_LIKE_LEVELS = 8
#: ... and one with at most this many, most of whose non-zero voxels equal their
#: neighbours (:data:`FLAT_FRACTION`), too. Real scans (even uint8 MR) score about 0.05.
LABEL_LIKE_LEVELS = 256
FLAT_FRACTION = 0.75
#: A "label map" with more distinct values than this is an intensity image.
MAX_LABELS = 1000
#: How far from an integer a label value stored as float may be (rounding of the file).
LABEL_TOLERANCE = 1e-3
#: Voxels examined for distinct values and flatness (a regular subsample beyond it).
_SAMPLE_VOXELS = 2_000_000


# ----------------------------------------------------------------------------- geometry
def _raw_pixdim(image):
    """The voxel sizes as the file's header stores them (nibabel silently replaces a zero
    by 1 and a negative size by its absolute value when it loads a NIfTI), or None."""
    filename = image.get_filename() if hasattr(image, "get_filename") else None
    header = getattr(image, "header", None)
    if not filename or header is None or "pixdim" not in getattr(header, "keys",
                                                                  lambda: ())():
        return None
    try:
        import nibabel as nib
        with nib.openers.ImageOpener(filename) as handle:
            raw = type(header).from_fileobj(handle, check=False)
        return np.asarray(raw["pixdim"][1:4], np.float64)
    except Exception:  # noqa: BLE001  not a single-file NIfTI: the affine still says it
        return None


def check_geometry(image, where: str, what: str = "image") -> None:
    """:class:`DataError` unless ``image`` (nibabel, 3-D) is a volume: at least
    :data:`MIN_EXTENT` voxels along each axis and finite, positive voxel sizes (in the
    header and in the affine)."""
    shape = tuple(int(n) for n in image.shape[:3])
    if len(shape) < 3 or min(shape) < MIN_EXTENT:
        raise DataError(f"{where}: {what} has {'x'.join(map(str, shape))} voxels; expected "
                        f"a 3-D scan (at least {MIN_EXTENT} voxels along every axis), not "
                        "a slice")
    pixdim = _raw_pixdim(image)
    if pixdim is not None and not (np.all(np.isfinite(pixdim)) and np.all(pixdim > 0)):
        raise DataError(f"{where}: {what} header gives voxel sizes "
                        f"{' x '.join(f'{v:g}' for v in pixdim)} mm; expected finite sizes "
                        "> 0 (pixdim[1:4])")
    affine = np.asarray(image.affine, np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0) if np.all(np.isfinite(affine)) \
        else np.full(3, np.nan)
    if not (np.all(np.isfinite(spacing)) and np.all(spacing > 1e-6)
            and abs(np.linalg.det(affine[:3, :3])) > 1e-12):
        raise DataError(f"{where}: {what} affine gives voxel sizes "
                        f"{' x '.join(f'{v:g}' for v in spacing)} mm; expected a finite, "
                        "invertible voxel-to-world affine (sform/qform) with sizes > 0")


def check_region_extent(start, stop, where: str) -> None:
    """:class:`DataError` when the content's box (before any margin) is thinner than
    :data:`MIN_EXTENT` voxels along an axis: one slice of content is no 3-D scan."""
    extent = np.asarray(stop) - np.asarray(start)
    if extent.min() < MIN_EXTENT:
        raise DataError(f"{where}: the content spans only {'x'.join(map(str, extent))} "
                        f"voxels; expected a 3-D scan (at least {MIN_EXTENT} voxels along "
                        "every axis)")


# ----------------------------------------------------------------------------- content
def _sample(data: np.ndarray) -> np.ndarray:
    data = np.asarray(data)
    step = int(np.ceil((data.size / _SAMPLE_VOXELS) ** (1 / 3))) if data.size else 1
    return data[::step, ::step, ::step] if step > 1 and data.ndim == 3 else data


def _is_integer_valued(data: np.ndarray) -> bool:
    if np.issubdtype(data.dtype, np.integer) or data.dtype == bool:
        return True
    return bool(np.all(np.abs(data - np.rint(data)) <= LABEL_TOLERANCE))


def flat_fraction(data: np.ndarray) -> float:
    """Fraction of the non-zero voxels equal to their next neighbour (mean over the three
    axes): about 0.9 in a label map, 0.05 in an MR scan."""
    data = np.asarray(data)
    nonzero = data != 0
    same = total = 0
    for axis in range(data.ndim):
        a, m = np.moveaxis(data, axis, 0), np.moveaxis(nonzero, axis, 0)
        same += int(np.count_nonzero((a[1:] == a[:-1]) & m[1:]))
        total += int(np.count_nonzero(m[1:]))
    return same / total if total else 1.0


def label_like(data: np.ndarray) -> str | None:
    """Why ``data`` looks like a label map rather than an intensity scan, or None."""
    sample = _sample(data)
    if sample.size == 0 or sample.min() < 0 or not _is_integer_valued(sample):
        return None                       # labels are integers >= 0 (CT's air is not)
    values = np.unique(sample)
    if len(values) > LABEL_LIKE_LEVELS:
        return None
    shown = ", ".join(f"{v:g}" for v in values[:5]) + (" ..." if len(values) > 5 else "")
    if len(values) <= MAX_LABEL_LIKE_LEVELS:
        return f"it holds {len(values)} distinct integer values ({shown})"
    flat = flat_fraction(sample)
    if flat >= FLAT_FRACTION:
        return (f"it holds {len(values)} distinct integer values ({shown}) in flat "
                f"regions ({100 * flat:.0f} % of its voxels equal their neighbour)")
    return None


def check_intensity_image(data: np.ndarray, where: str, what: str = "image") -> None:
    """:class:`DataError` when ``data`` (finite) is blank or constant, or looks like a
    label map (:func:`label_like`): no scan to register."""
    data = np.asarray(data)
    low, high = float(data.min()), float(data.max())
    if low == high:
        raise DataError(f"{where}: every voxel of the {what} is {low:g} (a "
                        f"{'blank' if low == 0 else 'constant'} volume); expected a scan")
    reason = label_like(data)
    if reason is not None:
        raise DataError(f"{where}: the {what} looks like a label map ({reason}); expected "
                        "an intensity scan (pass label maps as labels / segmentations)")


def check_label_map(data: np.ndarray, where: str) -> None:
    """:class:`DataError` unless ``data`` holds integer labels, at most :data:`MAX_LABELS`
    distinct values (more is an intensity image given as labels)."""
    data = np.asarray(data)
    if not np.all(np.isfinite(data)):
        raise DataError(f"{where}: label map holds NaN or infinite values; expected "
                        "integer labels")
    if not _is_integer_valued(data):
        off = np.abs(data - np.rint(data)) > LABEL_TOLERANCE
        raise DataError(f"{where}: {int(off.sum())} voxel(s) are not integer labels (e.g. "
                        f"{data[off].flat[0]:g}); expected a label map of integer values")
    count = len(np.unique(_sample(data)))
    if count > MAX_LABELS:
        raise DataError(f"{where}: {count} distinct values; expected a label map (at most "
                        f"{MAX_LABELS} labels), not an intensity image")


def empty_labels_warning(data: np.ndarray, where: str) -> str | None:
    """A warning when a label map holds no label (every voxel 0)."""
    if not np.any(np.asarray(data)):
        return f"{where}: the label map is empty (every voxel 0): no label to score"
    return None


# ----------------------------------------------------------------------------- pairs
def same_file(first, second) -> bool:
    """Whether two paths (str / Path; anything else is not a path) name one file."""
    if not isinstance(first, (str, os.PathLike)) or not isinstance(second,
                                                                   (str, os.PathLike)):
        return False
    try:
        return os.path.samefile(first, second)
    except OSError:
        return os.path.abspath(first) == os.path.abspath(second)


def check_distinct_pair(fixed_where: str, moving_where: str, fixed_volume=None,
                        moving_volume=None, same: bool = False) -> None:
    """:class:`DataError` when the fixed and moving scans are one scan (``same``: the
    caller knows they are one file or one entry; or identical volumes)."""
    identical = (fixed_volume is not None and moving_volume is not None
                 and np.shape(fixed_volume) == np.shape(moving_volume)
                 and np.array_equal(fixed_volume, moving_volume))
    if same or identical:
        how = "is the same scan as" if same else "is identical, voxel for voxel, to"
        raise DataError(f"{moving_where}: the moving scan {how} the fixed scan "
                        f"{fixed_where}; expected two different scans (a scan registered "
                        "to itself says nothing)")


# ----------------------------------------------------------------------------- splits, sizes
def check_subset_count(flag: str, count: int) -> None:
    """:class:`DataError` for a subset of one scan: pairs are two different scans, so it
    gives none (0 means no subset)."""
    if count == 1:
        raise DataError(f"{flag} 1: a subset of one scan gives no pair (pairs are two "
                        "different scans); expected 0 or at least 2")


def check_network_size(flag: str, size) -> str | None:
    """:class:`DataError` unless every size is a positive multiple of
    :data:`SIZE_MULTIPLE` (every network's stride); a warning when one is not a multiple
    of :data:`CRD_SIZE_MULTIPLE` (the cross-resolution student's)."""
    sizes = [int(n) for n in np.atleast_1d(size)]
    if any(n < SIZE_MULTIPLE or n % SIZE_MULTIPLE for n in sizes):
        raise DataError(f"{flag} {' '.join(map(str, sizes))}: expected sizes that are "
                        f"positive multiples of {SIZE_MULTIPLE} (the networks' total "
                        f"stride), e.g. {max(SIZE_MULTIPLE, round(max(sizes) / 32) * 32)}")
    if any(n % CRD_SIZE_MULTIPLE for n in sizes):
        return (f"{flag} {' '.join(map(str, sizes))}: not a multiple of "
                f"{CRD_SIZE_MULTIPLE}; the cross-resolution student (--crd) cannot train "
                "on this set")
    return None
