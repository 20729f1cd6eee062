"""aldk_tf/data/dicom.py: a generated DICOM series and the NIfTI of the same volume give
the same image in world space and the same prepared volume."""

import os

import nibabel as nib
import numpy as np
import pytest

from aldk_tf.data import DataError
from aldk_tf.data.preprocess import load_image, preprocess_scan

pydicom = pytest.importorskip("pydicom")

SHAPE = (14, 12, 10)                          # [column, row, slice] of the series


def write_series(folder, data, affine_lps, slope=2.0, intercept=-1024.0, uid="1.2.3",
                 prefix="IM"):
    """One file per slice (shuffled names), CT-like rescale, geometry from an LPS affine
    whose first two columns are the row / column directions times the spacing."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
    os.makedirs(folder, exist_ok=True)
    spacing_c = np.linalg.norm(affine_lps[:3, 0])
    spacing_r = np.linalg.norm(affine_lps[:3, 1])
    orientation = np.concatenate([affine_lps[:3, 0] / spacing_c,
                                  affine_lps[:3, 1] / spacing_r])
    stored = np.rint((data - intercept) / slope).astype(np.int16)
    names = np.random.default_rng(0).permutation(data.shape[2])
    for k in range(data.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesInstanceUID = "CT", uid
        ds.ImagePositionPatient = [float(v) for v in (affine_lps @ [0, 0, k, 1])[:3]]
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.PixelSpacing = [float(spacing_r), float(spacing_c)]
        ds.SliceThickness = float(np.linalg.norm(affine_lps[:3, 2]))
        ds.Rows, ds.Columns = data.shape[1], data.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()   # [row, col]
        ds.save_as(os.path.join(folder, f"{prefix}{names[k]:04d}.dcm"), enforce_file_format=True)
    return (stored.astype(np.float32) * slope + intercept)


@pytest.fixture
def series(tmp_path, rng):
    """An oblique series (rotated about z, axial slices stacked feet to head) of a CT-like
    volume, and the NIfTI of the same voxels with the RAS affine."""
    angle = np.deg2rad(20.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0.0],
                         [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]])
    affine_lps = np.eye(4)
    affine_lps[:3, :3] = rotation @ np.diag([0.8, 0.9, 2.5])
    affine_lps[:3, 3] = [-60.0, -40.0, 100.0]
    data = np.full(SHAPE, -1000.0, np.float32)
    data[3:11, 2:10, 2:8] = rng.uniform(-100, 200, (8, 8, 6))
    values = write_series(tmp_path / "dicom", data, affine_lps)
    nifti = tmp_path / "same.nii.gz"
    nib.save(nib.Nifti1Image(values, np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps), nifti)
    (tmp_path / "dicom" / "README.txt").write_text("not a DICOM file")
    return {"folder": str(tmp_path / "dicom"), "nifti": str(nifti), "values": values,
            "affine_lps": affine_lps}


def test_series_and_its_nifti_are_the_same_image(series):
    image = load_image(series["folder"])
    reference = nib.load(series["nifti"])
    np.testing.assert_allclose(image.affine, reference.affine, atol=1e-4)
    np.testing.assert_array_equal(image.get_fdata(), reference.get_fdata())
    # A world point: pixel (c=5, r=3) of slice 4 per the DICOM standard's formula, in RAS.
    lps = series["affine_lps"] @ [5, 3, 4, 1]
    np.testing.assert_allclose(image.affine @ [5, 3, 4, 1], lps * [-1, -1, 1, 1], atol=1e-4)


def test_series_and_its_nifti_give_the_same_prepared_volume(series):
    from_dicom = preprocess_scan(series["folder"], size=16, modality="ct")
    from_nifti = preprocess_scan(series["nifti"], size=16, modality="ct")
    np.testing.assert_array_equal(from_dicom.volume, from_nifti.volume)
    np.testing.assert_allclose(from_dicom.affine, from_nifti.affine, atol=1e-4)


def test_two_series_in_one_folder_are_refused(series, tmp_path):
    write_series(series["folder"], series["values"], series["affine_lps"], uid="9.9",
                 prefix="OTHER")
    with pytest.raises(DataError, match="2 DICOM series in one folder"):
        load_image(series["folder"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no DICOM image files"):
        load_image(str(empty))


def test_data_preparation_takes_a_folder_of_series(series, tmp_path):
    """aldk-prep --images ROOT: each subfolder of ROOT is one DICOM series (scan id =
    the folder's name), prepared exactly like its NIfTI."""
    from aldk_tf.cli import nifti_to_h5
    from aldk_tf.data import load_dataset_config, read_dataset
    root = tmp_path / "series"
    for number, name in enumerate(("a", "b")):      # two scans, not one twice
        values = series["values"]
        write_series(root / name, values + 40.0 * number * (values > -500),
                     series["affine_lps"], uid=f"1.2.3.{number}")
    assert nifti_to_h5.main(["--images", str(root), "--out", str(tmp_path / "set"),
                             "--size", "16", "--modality", "ct"]) == 0
    scans = read_dataset(load_dataset_config(tmp_path / "set.json").resolve_file("set"))
    expected = preprocess_scan(series["nifti"], size=16, modality="ct").volume
    assert sorted(scans) == ["a", "b"]
    np.testing.assert_array_equal(scans["a"]["volume"], expected)


def test_register_takes_a_series_folder(series, savedmodel_32_unrecorded, tmp_path):
    from aldk_tf.cli import register as register_cli
    out = tmp_path / "out"
    moving = nib.load(series["nifti"])                 # another scan on the same grid
    nib.save(nib.Nifti1Image(np.roll(np.asarray(moving.dataobj), 1, axis=0), moving.affine),
             tmp_path / "moving.nii.gz")
    assert register_cli.main(["--model", savedmodel_32_unrecorded, "--fixed",
                              series["folder"], "--moving", str(tmp_path / "moving.nii.gz"),
                              "--out", str(out), "--modality", "ct", "--crop", "none",
                              "--margin", "0", "--intensity", "window"]) == 0
    warped = nib.load(out / "warped.nii.gz")
    np.testing.assert_allclose(warped.affine, nib.load(series["nifti"]).affine, atol=1e-4)
    assert warped.shape == SHAPE
