"""aldk_tf/deploy/register.py: a NIfTI pair registered with an exported SavedModel."""

import os

import nibabel as nib
import numpy as np
import pytest
import tensorflow as tf

from aldk_tf import metrics, spatial
from aldk_tf.cli import register as register_cli
from aldk_tf.data.preprocess import preprocess_scan
from aldk_tf.deploy import register

from demo_nifti import demo_scans, write_pair


@pytest.fixture(scope="module")
def savedmodel(savedmodel_32):
    return savedmodel_32


@pytest.fixture(scope="module")
def nifti_pair(demo_dataset_32, tmp_path_factory):
    """Two demo test subjects as NIfTI; the moving one with its own (shifted) affine."""
    scans = demo_scans(demo_dataset_32)
    fixed_affine = scans["subject_04"]["attrs"]["affine"]
    moving_affine = fixed_affine.copy()
    moving_affine[:3, 3] += [12.0, -7.0, 3.0]
    return write_pair(tmp_path_factory.mktemp("nifti"), scans["subject_04"],
                      scans["subject_05"], fixed_affine, moving_affine)


def run(savedmodel, pair, out_dir, *extra):
    return register_cli.main(["--model", savedmodel, "--fixed", pair["fixed"], "--moving",
                              pair["moving"], "--moving-seg", pair["moving_seg"],
                              "--out", str(out_dir), "--crop", "none", "--jacobian",
                              "--preview", *extra])


@pytest.fixture(scope="module")
def registered(savedmodel, nifti_pair, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("registered") / "out"
    assert run(savedmodel, nifti_pair, out_dir) == 0
    return out_dir


def test_outputs_are_in_the_fixed_space_with_its_affine(registered, nifti_pair):
    fixed = nib.load(nifti_pair["fixed"])
    moving = nib.load(nifti_pair["moving"])
    assert not np.allclose(moving.affine, fixed.affine)
    assert sorted(os.listdir(registered)) == sorted(register.OUTPUT_NAMES
                                                    + register.OPTIONAL_NAMES)
    for name in ("warped.nii.gz", "flow.nii.gz", "warped_seg.nii.gz"):
        image = nib.load(registered / name)
        np.testing.assert_allclose(image.affine, fixed.affine, atol=1e-5)
        assert image.shape[:3] == fixed.shape
    flow = nib.load(registered / "flow.nii.gz")
    assert flow.shape == (*fixed.shape, 1, 3)
    assert flow.header.get_intent()[0] == "vector"
    png = registered / "preview.png"
    assert png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_outputs_are_compressed_gzip_files_nibabel_reads(registered):
    """Every NIfTI output is a gzip stream smaller than its voxels (ISA-L compresses
    even the flow's float vectors at no cost) that nibabel reads back."""
    for name in ("flow.nii.gz", "warped.nii.gz", "jacobian.nii.gz"):
        assert (registered / name).read_bytes()[:2] == b"\x1f\x8b", name
        image = nib.load(registered / name)
        voxel_bytes = np.asarray(image.dataobj).nbytes
        size = (registered / name).stat().st_size
        assert size < voxel_bytes, (name, size, voxel_bytes)


def test_outputs_follow_the_model_flow(registered, savedmodel, nifti_pair):
    """crop none on an unrotated grid: model voxel == fixed voxel, so the written field is
    the model's flow in mm plus the shift between the two scans' affines, and the written
    images are the library warp of the moving arrays."""
    fixed, moving = nib.load(nifti_pair["fixed"]), nib.load(nifti_pair["moving"])
    size = fixed.shape
    inputs = [preprocess_scan(image, size=size, crop="none", intensity="max").volume
              .astype(np.float32)[None, ..., None] / 255.0 for image in (fixed, moving)]
    loaded = tf.saved_model.load(savedmodel)
    flow = loaded.signatures["serving_default"](fixed=tf.constant(inputs[0]),
                                                moving=tf.constant(inputs[1]))["flow"]
    flow = flow.numpy()
    assert np.abs(flow).max() > 0.5
    spacing = np.diag(fixed.affine)[:3]
    written = nib.load(registered / "flow.nii.gz").get_fdata()[:, :, :, 0, :]
    written = written * [-1.0, -1.0, 1.0]                      # LPS (default) to RAS
    shift = moving.affine[:3, 3] - fixed.affine[:3, 3]
    np.testing.assert_allclose(written, flow[0] * spacing + shift, atol=1e-3)

    moving_data = np.asarray(moving.dataobj, np.float32)[None, ..., None]
    expected = spatial.warp(tf.constant(moving_data), flow).numpy()[0, ..., 0]
    warped = nib.load(registered / "warped.nii.gz").get_fdata()
    np.testing.assert_allclose(warped, expected, atol=1e-2)

    labels = np.asarray(nib.load(nifti_pair["moving_seg"]).dataobj)[None, ..., None]
    masks = metrics.warp_segmentation(labels, flow, [1, 2, 3])
    warped_seg = np.asarray(nib.load(registered / "warped_seg.nii.gz").dataobj)
    np.testing.assert_array_equal(metrics.segmentation_masks(warped_seg[None, ..., None],
                                                             [1, 2, 3]), masks)


def test_storage_orientation_does_not_change_the_result(registered, savedmodel,
                                                        nifti_pair, tmp_path):
    """The fixed scan stored x-flipped (same world): outputs are the flipped originals."""
    fixed = nib.load(nifti_pair["fixed"])
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = fixed.shape[0] - 1
    flipped = nib.Nifti1Image(np.asarray(fixed.dataobj)[::-1], fixed.affine @ flip)
    pair = {**nifti_pair, "fixed": str(tmp_path / "fixed_flipped.nii.gz")}
    nib.save(flipped, pair["fixed"])
    assert run(savedmodel, pair, tmp_path / "out") == 0
    for name in ("warped.nii.gz", "warped_seg.nii.gz", "flow.nii.gz"):
        original = nib.load(registered / name).get_fdata()
        result = nib.load(tmp_path / "out" / name)
        np.testing.assert_allclose(result.affine, flipped.affine, atol=1e-5)
        np.testing.assert_allclose(result.get_fdata()[::-1], original, atol=1e-3)


def test_existing_output_folder_needs_overwrite_and_keeps_no_stale_file(
        savedmodel, nifti_pair, tmp_path, capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "warped_seg.nii.gz").write_text("a previous pair's labels")
    base = os.path.dirname(savedmodel)                          # export/<name>: latest
    assert register.latest_version(base) == savedmodel
    pair = {key: value for key, value in nifti_pair.items() if key != "moving_seg"}
    arguments = ["--model", base, "--fixed", pair["fixed"], "--moving", pair["moving"],
                 "--out", str(out_dir), "--crop", "none"]
    assert register_cli.main(arguments) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--overwrite" in err[0], err
    assert sorted(os.listdir(out_dir)) == ["warped_seg.nii.gz"]  # untouched
    assert register_cli.main([*arguments, "--overwrite"]) == 0
    expected = sorted(set(register.OUTPUT_NAMES) - {"warped_seg.nii.gz"})
    assert sorted(os.listdir(out_dir)) == expected               # the stale file is gone
    assert sorted(os.listdir(tmp_path)) == ["out"]              # no staging left over


def test_label_values_above_32767_do_not_wrap(savedmodel, nifti_pair, registered,
                                              tmp_path):
    """Labels 1, 2, 3 renamed 40000, 65535, 3: the same voxels, in a uint16 file."""
    source = nib.load(nifti_pair["moving_seg"])
    labels = np.asarray(source.dataobj).astype(np.int32)
    renamed = np.select([labels == 1, labels == 2], [40000, 65535], labels)
    pair = {**nifti_pair, "moving_seg": str(tmp_path / "big_labels.nii.gz")}
    nib.save(nib.Nifti1Image(renamed.astype(np.int32), source.affine), pair["moving_seg"])
    assert run(savedmodel, pair, tmp_path / "out") == 0
    warped = nib.load(tmp_path / "out" / "warped_seg.nii.gz")
    assert warped.get_data_dtype() == np.uint16
    values = np.asarray(warped.dataobj)
    reference = np.asarray(nib.load(registered / "warped_seg.nii.gz").dataobj, np.int64)
    assert set(np.unique(values)) <= {0, 3, 40000, 65535}
    np.testing.assert_array_equal(values, np.select([reference == 1, reference == 2],
                                                    [40000, 65535], reference))


@pytest.mark.parametrize("case, expected", [
    ("four_d", "expected 3-D"),
    ("not_writable", "not writable"),
    ("no_model", "not a SavedModel"),
    ("missing_file", "file not found"),
])
def test_errors_are_one_line_and_write_nothing(case, expected, savedmodel, nifti_pair,
                                               tmp_path, capsys):
    pair, model, out_dir = dict(nifti_pair), savedmodel, tmp_path / "out"
    if case == "four_d":
        data = np.zeros((8, 8, 8, 2), np.float32)
        pair["moving"] = str(tmp_path / "four_d.nii.gz")
        nib.save(nib.Nifti1Image(data, np.eye(4)), pair["moving"])
    elif case == "not_writable":
        blocker = tmp_path / "file"
        blocker.write_text("")
        out_dir = blocker / "out"
    elif case == "no_model":
        model = str(tmp_path)
    elif case == "missing_file":
        pair["fixed"] = str(tmp_path / "absent.nii.gz")
    before = sorted(os.listdir(tmp_path))
    code = run(model, pair, out_dir)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert sorted(os.listdir(tmp_path)) == before
