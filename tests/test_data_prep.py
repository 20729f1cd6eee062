"""data_prep: NIfTI → RCN-layout HDF5 (preprocessing, CLI) and the offline demo set."""

import socket
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from aldk_tf.data import (DataError, load_dataset_config, read_dataset)
from aldk_tf.data.preprocess import bounding_box, preprocess_scan, to_source_grid
from scripts import load_script

ROOT = Path(__file__).resolve().parents[1]


def _script(name):
    return load_script(f"data_prep/{name}.py")


# A scan stored in a non-RAS orientation (axes permuted and flipped), anisotropic voxels.
AFFINE = np.array([[0.0, 0.0, -2.0, 40.0],
                   [-1.5, 0.0, 0.0, 30.0],
                   [0.0, 1.2, 0.0, -20.0],
                   [0.0, 0.0, 0.0, 1.0]])
SHAPE = (36, 44, 30)


def _phantom(rng, spot=(20, 12, 9)):
    """A box of tissue (random texture), a bright spot, and two labels."""
    data = np.zeros(SHAPE, np.float32)
    data[6:30, 5:40, 4:26] = rng.uniform(40, 60, (24, 35, 22))
    data[spot[0] - 1:spot[0] + 2, spot[1] - 1:spot[1] + 2, spot[2] - 1:spot[2] + 2] = 400.0
    labels = np.zeros(SHAPE, np.int16)
    labels[8:18, 8:30, 6:20] = 1
    labels[18:28, 8:30, 6:20] = 4
    return data, labels


def _write_phantoms(folder: Path, rng, count=4):
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    for index in range(count):
        data, labels = _phantom(rng)
        nib.save(nib.Nifti1Image(data, AFFINE), folder / "images" / f"sub{index}.nii.gz")
        nib.save(nib.Nifti1Image(labels, AFFINE), folder / "labels" / f"sub{index}.nii.gz")


def test_preprocess_reorients_crops_and_keeps_world_coordinates(rng):
    data, labels = _phantom(rng)
    image = nib.Nifti1Image(data, AFFINE)
    scan = preprocess_scan(image, label=nib.Nifti1Image(labels, AFFINE), size=24,
                           modality="mr", margin=2)
    assert scan.volume.shape == (24, 24, 24) and scan.volume.dtype == np.uint8
    assert scan.volume.min() == 0 and scan.volume.max() == 255
    assert set(np.unique(scan.segmentation)) == {0, 1, 4}
    # crop box = non-zero box of the RAS-reoriented data (nibabel reference) + margin
    canonical = nib.as_closest_canonical(image)
    assert nib.aff2axcodes(canonical.affine) == ("R", "A", "S")
    np.testing.assert_array_equal(scan.canonical_affine, canonical.affine)
    nonzero = np.argwhere(np.asarray(canonical.dataobj) != 0)
    np.testing.assert_array_equal(scan.crop_start, np.maximum(nonzero.min(0) - 2, 0))
    np.testing.assert_array_equal(scan.crop_stop,
                                  np.minimum(nonzero.max(0) + 3, canonical.shape))
    # the bright spot is at the same world position before and after
    spot_world = (AFFINE @ np.array([20, 12, 9, 1.0]))[:3]
    bright = scan.volume == 255
    spot_voxel = np.argwhere(bright).mean(axis=0)
    spot_after = (scan.affine @ np.append(spot_voxel, 1.0))[:3]
    voxel_mm = np.linalg.norm(scan.affine[:3, :3], axis=0).max()
    assert np.linalg.norm(spot_after - spot_world) < voxel_mm
    # labels map back onto the source grid
    back = to_source_grid(scan.segmentation, scan.attrs(), order=0)
    assert back.shape == SHAPE
    for value in (1, 4):
        overlap = 2 * np.sum((back == value) & (labels == value))
        assert overlap / (np.sum(back == value) + np.sum(labels == value)) > 0.85


@pytest.mark.parametrize("margin", [0, 3, 40])
def test_bounding_box_is_the_extent_of_the_nonzero_voxels(rng, margin):
    mask = np.zeros((30, 25, 20), bool)
    mask[rng.integers(2, 28, 40), rng.integers(5, 20, 40), rng.integers(1, 19, 40)] = True
    indices = np.argwhere(mask)
    start, stop = bounding_box(mask, margin)
    np.testing.assert_array_equal(start, np.maximum(indices.min(axis=0) - margin, 0))
    np.testing.assert_array_equal(stop, np.minimum(indices.max(axis=0) + 1 + margin,
                                                   mask.shape))
    assert start.dtype == stop.dtype == np.int64
    with pytest.raises(DataError, match="empty region"):
        bounding_box(np.zeros((4, 5, 6)), margin)


def test_ct_window_and_body_threshold_crop():
    data = np.full((40, 40, 30), -1000.0, np.float32)          # air
    data[5:30, 8:32, 3:27] = 50.0                              # body
    data[5:30, 8:32, 15] = 300.0
    data[5:30, 8:32, 16] = -200.0
    data[36:39, 5:35, 2:28] = 100.0                            # table, not joined to it
    scan = preprocess_scan(nib.Nifti1Image(data, np.eye(4)), size=(25, 24, 24),
                           modality="ct", margin=0)
    np.testing.assert_array_equal(scan.crop_start, [5, 8, 3])
    np.testing.assert_array_equal(scan.crop_stop, [30, 32, 27])
    assert scan.volume.shape == (25, 24, 24)
    centre = scan.volume[5:20, 5:19, 3:8]                      # body interior, plain 50 HU
    assert np.all(centre == round((50 + 200) / 500 * 255))
    assert scan.volume.max() == 255 and scan.volume.min() == 0
    assert scan.intensity_range == (-200.0, 300.0)


def test_nifti_to_h5_cli(tmp_path, rng, capsys):
    _write_phantoms(tmp_path, rng)
    cli = _script("nifti_to_h5")
    out = tmp_path / "datasets" / "phantom"
    assert cli.main(["--images", str(tmp_path / "images"), "--labels",
                     str(tmp_path / "labels" / "*.nii.gz"), "--out", str(out),
                     "--size", "16", "--val", "2"]) == 0
    config = load_dataset_config(out.with_suffix(".json"))
    assert config.image_size == (16, 16, 16)
    assert config.segmentation_class_value == {"1": 1, "4": 4}
    assert sorted(config.schemes) == ["1", "2"]
    splits = [set(config.scheme_ids(s)) for s in ("1", "2")]
    assert [len(s) for s in splits] == [2, 2]
    assert set.union(*splits) == {f"phantom/sub{i}" for i in range(4)}
    config.validate(check_labels=True)
    scans = read_dataset(config.resolve_file("phantom"))
    attrs = scans["sub0"]["attrs"]
    assert attrs["affine"].shape == (4, 4) and list(attrs["source_shape"]) == list(SHAPE)
    assert attrs["source"].endswith("sub0.nii.gz")

    capsys.readouterr()
    assert cli.main(["--images", str(tmp_path / "missing"), "--out",
                     str(tmp_path / "x")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and "missing" in error and "\n" not in error
    assert cli.main(["--images", str(tmp_path / "images"), "--labels",
                     str(tmp_path / "labels" / "sub0.nii.gz"), "--out",
                     str(tmp_path / "y")]) == 2
    assert "no label file named like image 'sub1'" in capsys.readouterr().err
    (tmp_path / "images" / "sub9.nii.gz").write_bytes(b"corrupt")
    assert cli.main(["--images", str(tmp_path / "images"), "--out",
                     str(tmp_path / "z")]) == 2
    assert "sub9.nii.gz: cannot read image" in capsys.readouterr().err
    assert not list(tmp_path.glob("[xyz]*")) and not list(tmp_path.glob(".*tmp"))


# ----------------------------------------------------------------------------- demo set
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo set at 32^3 for 5 subjects, built with network access blocked."""
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    patch = pytest.MonkeyPatch()
    patch.setattr(socket.socket, "connect", refuse)
    patch.setattr(socket, "create_connection", refuse)
    patch.setattr(socket, "getaddrinfo", refuse)
    try:
        from aldk_tf.data.demo_set import build_demo
        return build_demo(tmp_path_factory.mktemp("demo"), size=32, seed=0, subjects=6,
                          validation=2, test=2, log=None)
    finally:
        patch.undo()


def test_demo_builds_offline_with_anatomical_labels(demo):
    config = load_dataset_config(demo)
    config.validate(check_labels=True)
    assert config.image_size == (32, 32, 32)
    assert config.segmentation_class_value == {"CSF": 1, "GM": 2, "WM": 3}
    scans = read_dataset(config.resolve_file("demo"))
    for scan in scans.values():
        volume, labels = scan["volume"].astype(float), scan["segmentation"]
        means = [volume[labels == value].mean() for value in (0, 1, 2, 3)]
        assert means[3] > means[2] > means[1] > means[0]       # T1: WM > GM > CSF > air
        assert set(np.unique(labels)) == {0, 1, 2, 3}
        points = scan["point"]
        assert points.shape == (6, 3) and points.min() > 0 and points.max() < 31
        # landmarks sit inside the brain
        assert np.all(ndimage.map_coordinates(labels, points.T, order=0) > 0)


def test_demo_is_deterministic_and_test_subjects_are_held_out(demo):
    from aldk_tf.data.demo_set import load_template, make_subject

    config = load_dataset_config(demo)
    train = set(config.scheme_ids("1"))
    held_out = set(config.scheme_ids("2")) | set(config.scheme_ids("test"))
    assert len(train) == 2 and len(held_out) == 4 and not train & held_out
    assert config.scheme_ids("test") == ["demo/subject_04", "demo/subject_05"]
    stored = read_dataset(config.resolve_file("demo"))
    template = load_template(32)                       # rebuilt from scratch
    for index in (0, 4):
        again = make_subject(template, seed=0, index=index)
        for name in ("volume", "segmentation", "point"):
            np.testing.assert_array_equal(again[name], stored[f"subject_0{index}"][name])
    assert not np.array_equal(stored["subject_00"]["volume"], stored["subject_01"]["volume"])
    other_seed = make_subject(template, seed=1, index=0)
    assert np.mean(other_seed["segmentation"] != stored["subject_00"]["segmentation"]) > 0.05


def test_build_demo_cli_rejects_bad_arguments(tmp_path, capsys):
    cli = _script("build_demo")
    assert cli.main(["--out", str(tmp_path), "--size", "32", "--subjects", "3"]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert not list(tmp_path.iterdir())
    with pytest.raises(DataError):
        preprocess_scan(tmp_path / "absent.nii.gz")


def test_nifti_to_h5_matches_labels_by_name_only(tmp_path, rng, capsys):
    """Images s1..s5, labels s1, s2, s4, s5 and t3: equal counts must not re-pair labels."""
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    affine = np.eye(4)
    for name in ("s1", "s2", "s3", "s4", "s5"):
        nib.save(nib.Nifti1Image(rng.random((12, 12, 12)).astype(np.float32), affine),
                 images / f"{name}.nii.gz")
    for name in ("s1", "s2", "s4", "s5", "t3"):
        nib.save(nib.Nifti1Image(np.ones((12, 12, 12), np.uint8), affine),
                 labels / f"{name}_seg.nii.gz")
    cli = _script("nifti_to_h5")
    out = tmp_path / "out" / "set"
    common = ["--images", str(images), "--labels", str(labels), "--out", str(out),
              "--size", "16", "--val", "2", "--label-suffix", "_seg"]
    assert cli.main(common) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "'s3'" in error and "t3_seg.nii.gz" in error
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
    (labels / "t3_seg.nii.gz").rename(labels / "s3_seg.nii.gz")
    assert cli.main(common) == 0, capsys.readouterr().err


def test_a_nan_voxel_is_refused_not_blanked(tmp_path, rng):
    from aldk_tf.data import DataError
    data = rng.random((12, 12, 12)).astype(np.float32)
    data[3, 4, 5] = np.nan
    path = tmp_path / "nan.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    with pytest.raises(DataError, match="nan.nii.gz: 1 voxel"):
        preprocess_scan(path, size=8)


def test_label_values_up_to_65535_are_kept_as_uint16(tmp_path, rng):
    """FreeSurfer-style label values (aparc+aseg goes above 255) survive preparation."""
    data, labels = _phantom(rng)
    big = np.where(labels == 4, 65535, np.where(labels == 1, 1035, 0)).astype(np.int32)
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    for name in ("sub0", "sub1"):            # two scans: a training pair
        nib.save(nib.Nifti1Image(data if name == "sub0" else _phantom(rng)[0], AFFINE),
                 tmp_path / "images" / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(big, AFFINE), tmp_path / "labels" / f"{name}.nii.gz")
    convert = _script("nifti_to_h5")
    assert convert.main(["--images", str(tmp_path / "images"), "--labels",
                         str(tmp_path / "labels"), "--out", str(tmp_path / "big"),
                         "--size", "16"]) == 0
    config = load_dataset_config(tmp_path / "big.json")
    assert config.label_values == [1035, 65535]
    assert config.preprocessing.size == (16, 16, 16)
    scan = read_dataset(config.resolve_file("big"))["sub0"]
    assert scan["segmentation"].dtype == np.uint16
    assert set(np.unique(scan["segmentation"])) == {0, 1035, 65535}
    too_big = nib.Nifti1Image(big + 1, AFFINE)
    with pytest.raises(DataError, match="0..65535"):
        preprocess_scan(nib.Nifti1Image(data, AFFINE), label=too_big, size=16)


def test_a_truncated_nifti_fails_with_its_name(tmp_path):
    """nibabel reads voxels lazily: a cut .nii.gz must fail when loaded, naming the file,
    not later with a gzip traceback."""
    from aldk_tf.data.preprocess import load_image
    path = tmp_path / "scan.nii.gz"
    volume = np.random.default_rng(0).random((24, 24, 24)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), path)
    np.testing.assert_array_equal(np.asarray(load_image(path).dataobj), volume)
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match=r"cut\.nii\.gz: cannot read image"):
        load_image(cut)
