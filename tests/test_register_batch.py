"""aldk_tf/deploy/register_batch.py (aldk-register --pairs) and the in-memory Registrar."""

import csv
import os

import nibabel as nib
import numpy as np
import pytest

from aldk_tf.cli import register as register_cli
from aldk_tf.deploy import register

from demo_nifti import demo_scans, save_nifti


@pytest.fixture(scope="module")
def savedmodel(savedmodel_32):
    return savedmodel_32


@pytest.fixture(scope="module")
def scans(demo_dataset_32, tmp_path_factory):
    """Three demo subjects as NIfTI (+ labels) and an empty scan, in one folder."""
    stored = demo_scans(demo_dataset_32)
    folder = tmp_path_factory.mktemp("scans")
    for subject in ("subject_03", "subject_04", "subject_05"):
        affine = stored[subject]["attrs"]["affine"]
        save_nifti(folder / f"{subject}.nii.gz", stored[subject]["volume"], affine)
        save_nifti(folder / f"{subject}_seg.nii.gz", stored[subject]["segmentation"], affine)
    save_nifti(folder / "empty.nii.gz", np.zeros((32, 32, 32), np.uint8), np.eye(4))
    return folder


def write_csv(path, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerows(rows)
    return str(path)


def test_pairs_csv_registers_each_pair_once_loaded(savedmodel, scans, tmp_path,
                                                    monkeypatch, capsys):
    pairs = write_csv(scans / "pairs.csv", [
        ["fixed", "moving", "moving_seg", "name"],
        ["subject_04.nii.gz", "subject_05.nii.gz", "subject_05_seg.nii.gz", ""],
        ["subject_05.nii.gz", "subject_03.nii.gz", "", "b"],
        ["subject_04.nii.gz", "empty.nii.gz", "", "broken"]])
    loads = []
    original = register.load_serving_model
    monkeypatch.setattr(register, "load_serving_model",
                        lambda path: loads.append(path) or original(path))
    out_dir = tmp_path / "batch"
    code = register_cli.main(["--model", savedmodel, "--pairs", pairs, "--out",
                              str(out_dir), "--crop", "none", "--no-progress"])
    assert code == 1                                   # one pair failed, the others ran
    assert len(loads) == 1
    assert sorted(os.listdir(out_dir)) == ["b", "subject_04__subject_05", "summary.csv"]
    assert sorted(os.listdir(out_dir / "subject_04__subject_05")) == \
        sorted(register.OUTPUT_NAMES)
    with open(out_dir / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["name"] for row in rows] == ["subject_04__subject_05", "b", "broken"]
    assert [row["status"] for row in rows[:2]] == ["ok", "ok"]
    assert rows[2]["status"].startswith("error: ") and "empty.nii.gz" in rows[2]["status"]
    assert "broken: error:" in capsys.readouterr().err

    # The same pair registered alone gives the same files.
    single = tmp_path / "single"
    assert register_cli.main(["--model", savedmodel, "--fixed", str(scans / "subject_04.nii.gz"),
                              "--moving", str(scans / "subject_05.nii.gz"), "--moving-seg",
                              str(scans / "subject_05_seg.nii.gz"), "--out", str(single),
                              "--crop", "none"]) == 0
    for name in ("flow.nii.gz", "warped_seg.nii.gz", "warped.nii.gz"):
        np.testing.assert_array_equal(
            nib.load(single / name).get_fdata(),
            nib.load(out_dir / "subject_04__subject_05" / name).get_fdata())


@pytest.mark.parametrize("rows, expected", [
    ([["fixed", "image"], ["a", "b"]], "expected columns fixed, moving"),
    ([["fixed", "moving"]], "no pairs"),
])
def test_bad_pairs_csv_fails_with_one_line_before_any_work(rows, expected, savedmodel,
                                                            scans, tmp_path, capsys):
    pairs = write_csv(scans / f"bad_{len(rows)}_{len(rows[0])}.csv", rows)
    code = register_cli.main(["--model", savedmodel, "--pairs", pairs, "--out",
                              str(tmp_path / "out"), "--crop", "none", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and expected in err[0], err
    assert not (tmp_path / "out").exists()


def test_registrar_takes_nibabel_images_in_memory(savedmodel, scans, tmp_path):
    fixed, moving = (nib.load(scans / f"{s}.nii.gz") for s in ("subject_04", "subject_05"))
    registrar = register.Registrar(savedmodel, {"crop": "none"})
    result = registrar.register(fixed, moving)
    assert result.warped.shape == fixed.shape and result.warped_seg is None
    np.testing.assert_allclose(result.flow.affine, fixed.affine)
    register.write_registration(result, str(tmp_path / "out"))
    np.testing.assert_array_equal(nib.load(tmp_path / "out" / "warped.nii.gz").get_fdata(),
                                  result.warped.get_fdata())
    # The default LPS flow holds the field's only full-size copy; field_ras flips it back.
    lps = np.asarray(result.flow.dataobj)[:, :, :, 0, :]
    assert np.abs(lps[..., :2]).max() > 0.1
    np.testing.assert_array_equal(result.field_ras, lps * [-1.0, -1.0, 1.0])
    ras = registrar.register(fixed, moving, flow_space="ras")
    np.testing.assert_array_equal(ras.field_ras, result.field_ras)


def test_a_batch_finishes_bad_rows_in_the_summary(savedmodel, scans, tmp_path, capsys):
    """A missing file, a reused name and a DICOM series folder among good pairs: every
    good pair (the DICOM one too) is registered, the bad rows are in summary.csv with
    their reason, and the exit status is 1."""
    pydicom = pytest.importorskip("pydicom")  # noqa: F841
    from test_data_dicom import write_series
    fixed = nib.load(scans / "subject_04.nii.gz")
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ fixed.affine
    write_series(str(scans / "dicom_04"), np.asarray(fixed.dataobj, np.float32), lps,
                 slope=1.0, intercept=0.0)
    pairs = write_csv(scans / "mixed.csv", [
        ["fixed", "moving", "name"],
        ["subject_04.nii.gz", "absent.nii.gz", "missing"],
        ["dicom_04", "subject_05.nii.gz", "from_dicom"],
        ["subject_05.nii.gz", "subject_03.nii.gz", "good"],
        ["subject_05.nii.gz", "subject_04.nii.gz", "good"]])
    out_dir = tmp_path / "out"
    code = register_cli.main(["--model", savedmodel, "--pairs", pairs, "--out",
                              str(out_dir), "--crop", "none"])
    assert code == 1
    with open(out_dir / "summary.csv") as handle:
        rows = {row["name"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"missing", "from_dicom", "good", "good.line5"}
    assert rows["from_dicom"]["status"] == "ok" and rows["good"]["status"] == "ok"
    assert "absent.nii.gz not found" in rows["missing"]["status"]
    assert "used twice" in rows["good.line5"]["status"]
    assert float(rows["good"]["wall_seconds"]) > float(rows["good"]["network_seconds"]) > 0
    assert sorted(os.listdir(out_dir)) == ["from_dicom", "good", "summary.csv"]
    # The DICOM series gives what its NIfTI gives.
    single = tmp_path / "single"
    assert register_cli.main(["--model", savedmodel, "--fixed", str(scans /
                              "subject_04.nii.gz"), "--moving", str(scans /
                              "subject_05.nii.gz"), "--out", str(single), "--crop",
                              "none"]) == 0
    np.testing.assert_allclose(nib.load(out_dir / "from_dicom" / "warped.nii.gz").get_fdata(),
                               nib.load(single / "warped.nii.gz").get_fdata(), atol=1e-3)
    out = capsys.readouterr()
    assert "2 of 4 pairs registered" in out.out
    assert "\r" not in out.out and "\x1b" not in out.out       # not a terminal: plain lines
    assert "[4/4] good.line5: error:" in out.out


def test_registrar_takes_numpy_arrays(savedmodel, scans):
    """Arrays in, arrays out: the voxel flow takes fixed voxel x to the moving array's
    x + flow[x]; resampling the moving array there with scipy gives the warped array."""
    from scipy import ndimage
    fixed, moving = (nib.load(scans / f"{s}.nii.gz") for s in ("subject_04", "subject_05"))
    registrar = register.Registrar(savedmodel, {"crop": "none"})
    spacing = np.sqrt((fixed.affine[:3, :3] ** 2).sum(axis=0))
    moving_data = np.asarray(moving.dataobj)
    result = registrar.register_arrays(np.asarray(fixed.dataobj), moving_data,
                                       fixed_spacing=spacing, moving_spacing=spacing)
    assert result.flow.shape == (*fixed.shape, 3) and result.warped.shape == fixed.shape
    assert np.abs(result.flow).max() > 0.5
    points = np.moveaxis(np.indices(fixed.shape) + np.moveaxis(result.flow, -1, 0), 0, 0)
    expected = ndimage.map_coordinates(moving_data.astype(np.float64), points, order=1,
                                       mode="nearest")
    np.testing.assert_allclose(result.warped, expected, atol=1e-3)
    assert set(result.stats) >= {"folding_percent_model_grid", "folding_percent_fixed_grid"}
    # Plain arrays to register(): 1 mm grids, not an AttributeError.
    plain = registrar.register(np.asarray(fixed.dataobj), moving_data)
    np.testing.assert_allclose(plain.warped.affine, np.eye(4))
    with pytest.raises(register.DataError, match="expected 3-D"):
        registrar.register_arrays(np.zeros((4, 4)), moving_data)
