"""Scan preprocessing shared by ``data_prep/nifti_to_h5.py`` and registration of new scans.

A scan goes through, in this order:

1. reorientation to RAS (``nibabel.as_closest_canonical``: axis permutations and flips
   only, no interpolation);
2. a crop box in the reoriented voxel grid: a brain-mask or non-zero bounding box (MR),
   or the bounding box of the largest connected region above an intensity threshold (CT:
   the body; a label bounding box is also available, e.g. around the liver);
3. intensities to 0..255: a fixed window for CT (Hounsfield units), percentiles for MR,
   or ``0 .. max`` (intensity ``max``: how the demo data's template was scaled);
4. resampling of the box to the target size (default 128³), trilinear with Gaussian
   anti-aliasing when shrinking; labels by nearest neighbour.

Voxel centres are aligned (output voxel ``o`` samples box coordinate
``(o + 0.5) * n / size - 0.5``). The result keeps, as HDF5 attributes, the affine from the
preprocessed voxel grid to world (scanner RAS, mm) coordinates and the crop box, so
results can be written as NIfTI in the original world space or resampled back onto the
original grid with :func:`to_source_grid`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from . import checks
from .errors import DataError

# nibabel and scipy.ndimage are imported where they are used: the command lines import
# this module for its choices (modalities, crops) and answer --help without them.

MODALITIES = ("mr", "ct")
CROPS = ("auto", "mask", "nonzero", "threshold", "label", "none")
#: How intensities go to 0..255: "auto" = window for CT, percentiles for MR; "max" = 0 to 0
#: and the scan's maximum to 255 (the demo data's template is max-normalised).
INTENSITIES = ("auto", "window", "percentiles", "max")
DEFAULT_SIZE = 128
CT_WINDOW = (-200.0, 300.0)          # Hounsfield units mapped to 0 and 255 (abdomen)
CT_BODY_THRESHOLD = -500.0           # HU above which a voxel counts as body, for cropping
MR_PERCENTILES = (0.5, 99.5)         # percentiles of the non-zero voxels mapped to 0, 255
MAX_LABEL = 65535                    # label values are stored as uint16 at most


@dataclass
class PreprocessSettings:
    """How scans were prepared: stored as ``"preprocessing"`` in the dataset JSON by the
    data preparation, copied into the run's ``config.json`` and the export's
    ``export_info.json``, and used by ``register`` so new scans are prepared the same way.
    """

    modality: str = "mr"
    crop: str = "auto"
    margin: int = 2
    window: tuple[float, float] = CT_WINDOW
    percentiles: tuple[float, float] = MR_PERCENTILES
    threshold: float = CT_BODY_THRESHOLD
    size: tuple[int, int, int] = (DEFAULT_SIZE,) * 3
    binary_label: bool = False
    used_masks: bool = False         # masks were given (crop "auto" then means "mask")
    intensity: str = "auto"          # one of INTENSITIES

    def __post_init__(self):
        if self.modality not in MODALITIES:
            raise DataError(f"modality: expected one of {MODALITIES}, got '{self.modality}'")
        if self.crop not in CROPS:
            raise DataError(f"crop: expected one of {CROPS}, got '{self.crop}'")
        if self.intensity not in INTENSITIES:
            raise DataError(f"intensity: expected one of {INTENSITIES}, got "
                            f"'{self.intensity}'")
        self.window = tuple(float(v) for v in self.window)
        self.percentiles = tuple(float(v) for v in self.percentiles)
        self.size = ((int(self.size),) * 3 if np.ndim(self.size) == 0
                     else tuple(int(n) for n in self.size))
        self.margin, self.threshold = int(self.margin), float(self.threshold)
        if not np.isfinite(self.threshold):
            raise DataError(f"threshold: expected a finite value in HU, got {self.threshold}")
        if len(self.window) != 2 or not -np.inf < self.window[0] < self.window[1] < np.inf:
            raise DataError(f"window: expected finite LOW < HIGH, got {self.window}")
        if len(self.percentiles) != 2 or not 0 <= self.percentiles[0] < \
                self.percentiles[1] <= 100:
            raise DataError(f"percentiles: expected 0 <= LOW < HIGH <= 100, got "
                            f"{self.percentiles}")
        if len(self.size) != 3 or min(self.size) < 1 or self.margin < 0:
            raise DataError(f"size {self.size} / margin {self.margin}: expected three "
                            "positive sizes and a margin >= 0")

    @property
    def effective_crop(self) -> str:
        """The crop rule "auto" resolved as the preparation resolved it."""
        if self.crop != "auto":
            return self.crop
        if self.used_masks:
            return "mask"
        return "threshold" if self.modality == "ct" else "nonzero"

    @property
    def effective_intensity(self) -> str:
        """The intensity rule "auto" resolved: the window for CT, percentiles for MR."""
        if self.intensity != "auto":
            return self.intensity
        return "window" if self.modality == "ct" else "percentiles"

    def to_dict(self) -> dict:
        data = asdict(self)
        for key in ("window", "percentiles", "size"):
            data[key] = list(data[key])
        return data

    @classmethod
    def from_dict(cls, data, where: str = "preprocessing") -> "PreprocessSettings":
        """Settings from their JSON form; :class:`DataError` naming ``where`` if invalid."""
        if not isinstance(data, dict):
            raise DataError(f"{where}: expected an object of preprocessing settings, "
                            f"got {data!r}")
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise DataError(f"{where}: unknown preprocessing setting(s) {unknown}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as error:
            raise DataError(f"{where}: {error}") from None

    def scan_arguments(self) -> dict:
        """Keyword arguments of :func:`preprocess_scan` (besides image, label and mask)."""
        return {"size": self.size, "modality": self.modality, "crop": self.crop,
                "margin": self.margin, "window": self.window,
                "percentiles": self.percentiles, "threshold": self.threshold,
                "binary_label": self.binary_label, "intensity": self.intensity}

    def describe(self) -> str:
        """One line: the settings that matter for this modality."""
        intensity = {"window": f"window {self.window[0]:g}..{self.window[1]:g} HU",
                     "percentiles": f"percentiles {self.percentiles[0]:g}.."
                                    f"{self.percentiles[1]:g}",
                     "max": "intensities 0..max"}[self.effective_intensity]
        crop = self.effective_crop + (f" (threshold {self.threshold:g} HU)"
                                      if self.effective_crop == "threshold" else "")
        return (f"modality {self.modality}, {intensity}, crop {crop}, margin "
                f"{self.margin}, size {'x'.join(map(str, self.size))}")


@dataclass
class PreprocessedScan:
    """A preprocessed scan: uint8 volume (+ labels) and how it maps to the source."""

    volume: np.ndarray                       # uint8 [S, S, S]
    segmentation: np.ndarray | None          # uint8 (uint16 above 255) [S, S, S]
    affine: np.ndarray                       # 4x4: preprocessed voxel -> world (mm)
    crop_start: np.ndarray                   # box in the RAS-reoriented voxel grid
    crop_stop: np.ndarray
    canonical_affine: np.ndarray             # 4x4 of the RAS-reoriented scan
    canonical_shape: tuple
    source_affine: np.ndarray                # 4x4 of the file as stored
    source_shape: tuple
    intensity_range: tuple                   # source intensities mapped to 0 and 255
    source: str = ""

    def attrs(self) -> dict:
        """HDF5 attributes of this scan (see :func:`to_source_grid`)."""
        return {"affine": self.affine, "crop_start": self.crop_start,
                "crop_stop": self.crop_stop, "canonical_affine": self.canonical_affine,
                "canonical_shape": np.asarray(self.canonical_shape),
                "source_affine": self.source_affine,
                "source_shape": np.asarray(self.source_shape),
                "intensity_range": np.asarray(self.intensity_range, np.float64),
                "source": self.source}


# ----------------------------------------------------------------------------- loading
def load_image(path_or_image, what: str = "image"):
    """A NIfTI (or other nibabel-readable) image, or a folder holding one DICOM series
    (:mod:`aldk_tf.data.dicom`), 3-D, with a :class:`DataError` on failure."""
    import nibabel as nib

    if isinstance(path_or_image, (str, Path)) and Path(path_or_image).is_dir():
        from .dicom import load_series            # a folder: one DICOM series
        image = load_series(str(path_or_image))
    elif isinstance(path_or_image, (str, Path)):
        path = Path(path_or_image)
        if not path.exists():
            raise DataError(f"{path}: {what} file not found")
        try:
            image = nib.load(str(path))
            # The voxels are read lazily: read them now, so that a truncated or corrupt
            # file fails here with its name, not later inside the pipeline.
            image = image.__class__(np.asanyarray(image.dataobj), image.affine,
                                    image.header)
            image.set_filename(str(path))          # errors further on name the file
        except Exception as exc:  # nibabel, gzip, zlib raise many types for bad files
            reason = " ".join(str(exc).split()) or type(exc).__name__
            raise DataError(f"{path}: cannot read {what} ({reason})") from None
    elif hasattr(path_or_image, "dataobj") and hasattr(path_or_image, "affine"):
        image = path_or_image
    else:
        raise DataError(f"{what}: expected a NIfTI path, a DICOM folder or a nibabel "
                        f"image, got {type(path_or_image).__name__} (numpy arrays: "
                        "aldk_tf.deploy.register.Registrar.register_arrays)")
    shape = image.shape
    if len(shape) == 4 and shape[3] == 1:
        image = image.slicer[..., 0]
    elif len(shape) != 3:
        raise DataError(f"{_name(path_or_image)}: {what} has shape {shape}, expected 3-D")
    checks.check_geometry(image, _name(path_or_image), what)
    return image


def _name(path_or_image) -> str:
    if isinstance(path_or_image, (str, Path)):
        return str(path_or_image)
    return str(path_or_image.get_filename() or "<image>")


def canonical(image) -> tuple[np.ndarray, np.ndarray]:
    """(float32 data, affine) of an image reoriented to RAS (no interpolation)."""
    import nibabel as nib

    reoriented = nib.as_closest_canonical(image)
    return np.asarray(reoriented.dataobj, dtype=np.float32), reoriented.affine.copy()


# ----------------------------------------------------------------------------- crop box
def bounding_box(mask: np.ndarray, margin: int = 0, where: str = "mask"):
    """``(start, stop)`` voxel indices of the non-zero region of ``mask``, plus a margin
    (from the mask's projections onto each axis: no list of the region's voxels)."""
    mask = np.asarray(mask)
    start, stop = [], []
    for axis in range(mask.ndim):
        others = tuple(other for other in range(mask.ndim) if other != axis)
        occupied = np.flatnonzero(np.any(mask, axis=others))
        if occupied.size == 0:
            raise DataError(f"{where}: empty region, nothing to crop to")
        start.append(occupied[0])
        stop.append(occupied[-1] + 1)
    start = np.maximum(np.asarray(start, np.int64) - margin, 0)
    stop = np.minimum(np.asarray(stop, np.int64) + margin, mask.shape)
    return start.astype(np.int64), stop.astype(np.int64)


def threshold_mask(data: np.ndarray, threshold: float,
                   largest_component: bool = True) -> np.ndarray:
    """Voxels above ``threshold``; optionally only the largest 6-connected component
    (drops the CT table and noise that are not joined to the body)."""
    from scipy import ndimage

    mask = data > threshold
    if largest_component and mask.any():
        labels, count = ndimage.label(mask)
        if count > 1:
            sizes = np.bincount(labels.ravel())
            sizes[0] = 0
            mask = labels == np.argmax(sizes)
    return mask


# ----------------------------------------------------------------------------- intensity
def intensity_range(data: np.ndarray, modality: str, window=CT_WINDOW,
                    percentiles=MR_PERCENTILES, mask: np.ndarray | None = None,
                    intensity: str = "auto"):
    """Source intensities to map to 0 and 255: the CT window, MR percentiles of the
    voxels in ``mask`` (default: the non-zero voxels, all voxels if none), or 0 and the
    maximum (``intensity="max"``). ``intensity`` "auto" is the window for CT and the
    percentiles for MR."""
    if intensity == "auto":
        intensity = "window" if modality == "ct" else "percentiles"
    if intensity == "max":
        low, high = 0.0, float(data.max())
    elif intensity == "window":
        low, high = float(window[0]), float(window[1])
    else:
        if mask is None:
            mask = data != 0
        values = data[mask] if mask.any() else data.ravel()
        low, high = (float(v) for v in np.percentile(values, percentiles))
    if not high > low:
        high = low + 1.0
    return low, high


def to_uint8(data: np.ndarray, low: float, high: float) -> np.ndarray:
    """Linear map ``low → 0``, ``high → 255``, clipped and rounded."""
    scaled = (data.astype(np.float32) - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------- resampling
def resample_box(data: np.ndarray, start, stop, size, order: int) -> np.ndarray:
    """Resample ``data[start:stop]`` to ``size`` (voxel centres aligned).

    ``order=1`` (images): trilinear after a Gaussian of sigma ``(factor - 1) / 2`` on axes
    that shrink by ``factor``; ``order=0`` (labels): nearest neighbour, no smoothing.
    """
    from scipy import ndimage

    box = data[tuple(slice(a, b) for a, b in zip(start, stop))]
    scale = np.asarray(box.shape, np.float64) / np.asarray(size, np.float64)
    if order > 0:
        sigma = np.maximum((scale - 1.0) / 2.0, 0.0)
        if sigma.any():
            box = ndimage.gaussian_filter(box.astype(np.float32), sigma, mode="nearest")
    return ndimage.affine_transform(box, scale, offset=0.5 * scale - 0.5,
                                    output_shape=tuple(size), order=order,
                                    mode="nearest")


def box_affine(canonical_affine: np.ndarray, start, stop, size) -> np.ndarray:
    """4x4 affine from the resampled box's voxel indices to world coordinates."""
    scale = (np.asarray(stop) - np.asarray(start)) / np.asarray(size, np.float64)
    to_box = np.eye(4)
    to_box[:3, :3] = np.diag(scale)
    to_box[:3, 3] = np.asarray(start) + 0.5 * scale - 0.5
    return canonical_affine @ to_box


def to_source_grid(array: np.ndarray, attrs: dict, order: int = 0,
                   cval: float = 0.0) -> np.ndarray:
    """Resample a preprocessed-space array back onto the original scan's voxel grid.

    Uses the ``affine``, ``source_affine`` and ``source_shape`` attributes of the scan;
    voxels outside the crop box get ``cval``. ``order=0`` for labels, 1 for images.
    """
    from scipy import ndimage

    source_to_preprocessed = np.linalg.inv(attrs["affine"]) @ attrs["source_affine"]
    return ndimage.affine_transform(
        array, source_to_preprocessed[:3, :3], offset=source_to_preprocessed[:3, 3],
        output_shape=tuple(int(n) for n in attrs["source_shape"]), order=order,
        mode="constant", cval=cval)


# ----------------------------------------------------------------------------- pipeline
def preprocess_scan(image, label=None, mask=None, size=DEFAULT_SIZE, modality: str = "mr",
                    crop: str = "auto", margin: int = 2, window=CT_WINDOW,
                    percentiles=MR_PERCENTILES, threshold: float = CT_BODY_THRESHOLD,
                    binary_label: bool = False, intensity: str = "auto") -> PreprocessedScan:
    """Reorient, crop, normalise and resample one scan (see the module docstring).

    Args:
      image: NIfTI path or nibabel image.
      label: optional label image on the same grid (integer values, kept as they are;
        with ``binary_label`` any non-zero value becomes 255, as in the liver sets).
      mask: optional brain/organ mask on the same grid (used by ``crop="mask"`` and for
        MR percentiles).
      size: an int (cubic) or three ints.
      modality: "mr" (percentile normalisation) or "ct" (window in HU).
      crop: "auto" (mask if given, else non-zero box for MR, threshold box for CT),
        "mask", "nonzero", "threshold", "label" (box of the non-zero labels) or "none".
      margin: voxels added around the crop box (in the reoriented source grid).
      intensity: "auto" (window for CT, percentiles for MR), "window", "percentiles" or
        "max" (0 -> 0, the scan's maximum -> 255).
    """
    if modality not in MODALITIES:
        raise DataError(f"modality: expected one of {MODALITIES}, got '{modality}'")
    if crop not in CROPS:
        raise DataError(f"crop: expected one of {CROPS}, got '{crop}'")
    size = (int(size),) * 3 if np.ndim(size) == 0 else tuple(int(n) for n in size)
    name = _name(image)
    image = load_image(image)
    data, affine = canonical(image)
    bad = int(np.count_nonzero(~np.isfinite(data)))
    if bad:
        # np.percentile of data with a NaN is NaN, and every voxel would then map to 0.
        raise DataError(f"{name}: {bad} voxel(s) are NaN or infinite; expected finite "
                        "intensities (replace them, e.g. by 0, before preparing the scan)")
    checks.check_intensity_image(data, name)
    extra = {}
    for what, item in (("label", label), ("mask", mask)):
        if item is None:
            continue
        loaded = load_image(item, what)
        if loaded.shape != image.shape or not np.allclose(loaded.affine, image.affine,
                                                          atol=1e-3):
            raise DataError(f"{_name(item)}: {what} grid (shape {loaded.shape}) differs "
                            f"from the image {name} (shape {image.shape})")
        values, _ = canonical(loaded)
        extra[what] = values
    if "label" in extra:
        checks.check_label_map(extra["label"], _name(label))     # not rounded into labels
        labels = np.rint(extra["label"])
        if binary_label:
            labels = np.where(labels != 0, 255, 0)
        elif labels.min() < 0 or labels.max() > MAX_LABEL:
            raise DataError(f"{_name(label)}: label values must lie in 0..{MAX_LABEL} "
                            f"(found {labels.min():g}..{labels.max():g}); use binary labels "
                            "or remap them")
        extra["label"] = labels.astype(np.uint8 if labels.max() <= 255 else np.uint16)
    if "mask" in extra:
        extra["mask"] = extra["mask"] > 0

    if crop == "auto":
        crop = "mask" if "mask" in extra else ("threshold" if modality == "ct" else "nonzero")
    if crop in ("mask", "label") and crop not in extra:
        raise DataError(f"{name}: crop='{crop}' needs a {crop} file")
    if crop == "none":
        start, stop = np.zeros(3, np.int64), np.asarray(data.shape, np.int64)
    else:
        region = {"mask": lambda: extra.get("mask"), "label": lambda: extra.get("label"),
                  "nonzero": lambda: data != 0,
                  "threshold": lambda: threshold_mask(data, threshold)}[crop]()
        start, stop = bounding_box(region, margin, where=f"{name} ({crop} crop)")
        checks.check_region_extent(*bounding_box(region), where=f"{name} ({crop} crop)")

    if intensity not in INTENSITIES:
        raise DataError(f"intensity: expected one of {INTENSITIES}, got '{intensity}'")
    low, high = intensity_range(data, modality, window, percentiles, extra.get("mask"),
                                intensity)
    box = resample_box(data, start, stop, size, order=1)
    segmentation = None
    if "label" in extra:
        segmentation = resample_box(extra["label"], start, stop, size, order=0)
    return PreprocessedScan(
        volume=to_uint8(box, low, high), segmentation=segmentation,
        affine=box_affine(affine, start, stop, size), crop_start=start, crop_stop=stop,
        canonical_affine=affine, canonical_shape=tuple(data.shape),
        source_affine=image.affine.copy(), source_shape=tuple(image.shape),
        intensity_range=(low, high), source=name)
