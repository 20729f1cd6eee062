"""A folder holding one DICOM series as a nibabel image (RAS affine, like a NIfTI).

Read with pydicom (optional extra ``aldk-tf[dicom]``): pure Python, maintained, and it
exposes the raw geometry tags, so the voxel-to-world map is built here from the
standard's definitions instead of a second image library's conventions.

Geometry (DICOM PS3.3 C.7.6.2, patient coordinates are LPS): the pixel in row ``r``,
column ``c`` of a slice lies at ``ImagePositionPatient + c * Δc * X + r * Δr * Y`` where
``X``, ``Y`` are the two direction cosines of ``ImageOrientationPatient`` and
``PixelSpacing = [Δr, Δc]``. Slices are ordered along ``X × Y`` by their position; the
array is ``[column, row, slice]`` (so NIfTI-style, x fastest) and its affine is the LPS
one with the first two rows negated (RAS). Intensities are
``pixel * RescaleSlope + RescaleIntercept`` (Hounsfield units for CT).
"""

from __future__ import annotations

import os

import numpy as np

from .errors import DataError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _pydicom():
    try:
        import pydicom
    except ImportError:
        raise DataError("DICOM input needs pydicom: pip install 'aldk-tf[dicom]'") \
            from None
    return pydicom


def read_series(folder: str) -> tuple[np.ndarray, np.ndarray]:
    """``(float32 data [X, Y, Z], 4x4 RAS affine)`` of the one series in ``folder``."""
    pydicom = _pydicom()
    slices = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        try:
            dataset = pydicom.dcmread(path)
        except (pydicom.errors.InvalidDicomError, OSError):
            continue                                   # not a DICOM file (e.g. a note)
        if "PixelData" in dataset:
            slices.append(dataset)
    if not slices:
        raise DataError(f"{folder}: no DICOM image files in this folder")
    series = {str(s.get("SeriesInstanceUID", "")) for s in slices}
    if len(series) > 1:
        raise DataError(f"{folder}: {len(series)} DICOM series in one folder; expected "
                        "one (put each series in its own folder)")
    try:
        orientation = np.asarray(slices[0].ImageOrientationPatient, np.float64)
        spacing = np.asarray(slices[0].PixelSpacing, np.float64)      # [Δr, Δc]
        positions = np.asarray([s.ImagePositionPatient for s in slices], np.float64)
    except AttributeError as error:
        raise DataError(f"{folder}: DICOM geometry tag missing ({error})") from None
    row_cosine, column_cosine = orientation[:3], orientation[3:]
    normal = np.cross(row_cosine, column_cosine)
    for dataset in slices:
        if not np.allclose(dataset.ImageOrientationPatient, orientation, atol=1e-4):
            raise DataError(f"{folder}: slices with different orientations")
    order = np.argsort(positions @ normal)
    slices, positions = [slices[i] for i in order], positions[order]
    if len(slices) > 1:
        steps = np.diff(positions, axis=0)
        if not np.allclose(steps, steps[0], atol=1e-3 * max(1.0, np.abs(steps[0]).max())):
            raise DataError(f"{folder}: slices are not evenly spaced (missing or "
                            "duplicate slices?)")
        slice_step = (positions[-1] - positions[0]) / (len(slices) - 1)
    else:
        slice_step = normal * float(slices[0].get("SliceThickness", 1.0))
    shape = slices[0].pixel_array.shape
    data = np.empty((shape[1], shape[0], len(slices)), np.float32)    # [c, r, slice]
    for index, dataset in enumerate(slices):
        if dataset.pixel_array.shape != shape:
            raise DataError(f"{folder}: slices of different sizes")
        slope = float(dataset.get("RescaleSlope", 1.0))
        intercept = float(dataset.get("RescaleIntercept", 0.0))
        data[:, :, index] = dataset.pixel_array.T.astype(np.float32) * slope + intercept
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_cosine * spacing[1]
    affine_lps[:3, 1] = column_cosine * spacing[0]
    affine_lps[:3, 2] = slice_step
    affine_lps[:3, 3] = positions[0]
    return data, LPS_TO_RAS @ affine_lps


def load_series(folder: str):
    """A ``nibabel.Nifti1Image`` of the DICOM series in ``folder`` (RAS affine)."""
    import nibabel as nib
    data, affine = read_series(folder)
    return nib.Nifti1Image(data, affine)
