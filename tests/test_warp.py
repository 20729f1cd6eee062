"""aldk_tf/deploy/warp.py: a flow saved by register applied to other images (aldk-warp), flow
spaces RAS/LPS checked with an independent resampler (scipy) and nibabel's affines."""

import os

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from aldk_tf.cli import register as register_cli
from aldk_tf.cli import warp as warp_cli
from aldk_tf.deploy import warp

from demo_nifti import demo_scans, write_pair

#: Fixed voxel -> world for ITK/ANTs: the NIfTI (RAS) affine with x and y negated.
RAS_TO_LPS_4 = np.diag([-1.0, -1.0, 1.0, 1.0])


@pytest.fixture(scope="module")
def savedmodel(savedmodel_32):
    return savedmodel_32


@pytest.fixture(scope="module")
def pair(demo_dataset_32, tmp_path_factory):
    """Two demo subjects; the fixed one oblique (rotated affine), the moving one shifted,
    so that RAS and LPS vectors differ and grids differ."""
    scans = demo_scans(demo_dataset_32)
    fixed_scan, moving_scan = scans["subject_04"], scans["subject_05"]
    angle = np.deg2rad(10.0)
    rotation = np.eye(4)
    rotation[:2, :2] = [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    fixed_affine = rotation @ fixed_scan["attrs"]["affine"]
    moving_affine = fixed_scan["attrs"]["affine"].copy()
    moving_affine[:3, 3] += [6.0, -4.0, 2.0]
    return write_pair(tmp_path_factory.mktemp("warp_pair"), fixed_scan, moving_scan,
                      fixed_affine, moving_affine)


def _register(savedmodel, pair, out_dir, space):
    """``space`` "lps" is register's default: no --flow-space flag."""
    flags = [] if space == "lps" else ["--flow-space", space]
    assert register_cli.main(["--model", savedmodel, "--fixed", pair["fixed"], "--moving",
                              pair["moving"], "--moving-seg", pair["moving_seg"],
                              "--out", str(out_dir), "--crop", "none", "--jacobian",
                              *flags]) == 0
    return out_dir


@pytest.fixture(scope="module")
def registered(savedmodel, pair, tmp_path_factory):
    folder = tmp_path_factory.mktemp("registered")
    return {space: _register(savedmodel, pair, folder / space, space)
            for space in ("ras", "lps")}


def test_warping_the_labels_with_the_saved_flow_equals_registers_labels(registered, pair,
                                                                        tmp_path):
    for space in ("ras", "lps"):                      # auto: the space from the file
        out = str(tmp_path / f"seg_{space}.nii.gz")
        assert warp_cli.main(["--flow", str(registered[space] / "flow.nii.gz"), "--image",
                          pair["moving_seg"], "--out", out,
                          "--interpolation", "labels"]) == 0
        written = nib.load(registered["ras"] / "warped_seg.nii.gz")
        result = nib.load(out)
        np.testing.assert_array_equal(np.asarray(result.dataobj),
                                      np.asarray(written.dataobj))
        np.testing.assert_allclose(result.affine, written.affine, atol=1e-6)
    image = str(tmp_path / "image.nii.gz")
    assert warp_cli.main(["--flow", str(registered["ras"] / "flow.nii.gz"), "--image",
                      pair["moving"], "--out", image]) == 0
    np.testing.assert_allclose(nib.load(image).get_fdata(),
                               nib.load(registered["ras"] / "warped.nii.gz").get_fdata(),
                               atol=1e-4)


def test_lps_flow_moves_a_point_where_the_ras_flow_does(registered, pair):
    """Independent resampler: scipy map_coordinates with the affines, the LPS field used
    the ITK way (fixed grid's LPS affine, vectors in LPS, back to RAS for the NIfTI)."""
    ras = nib.load(registered["ras"] / "flow.nii.gz")
    lps = nib.load(registered["lps"] / "flow.nii.gz")
    assert ras.header.get_intent()[2] == "displacement RAS"
    assert lps.header.get_intent() == ("vector", (), "displacement LPS")   # the default
    assert lps.shape == (*nib.load(pair["fixed"]).shape, 1, 3)          # as ITK reads it
    assert lps.header.get_xyzt_units()[0] == "mm"
    u_ras, u_lps = ras.get_fdata()[:, :, :, 0], lps.get_fdata()[:, :, :, 0]
    assert np.abs(u_ras[..., :2]).max() > 1.0                    # x, y flips matter
    np.testing.assert_allclose(u_lps, u_ras * [-1, -1, 1], atol=1e-5)

    fixed, moving = nib.load(pair["fixed"]), nib.load(pair["moving"])
    voxels = np.indices(fixed.shape).reshape(3, -1).T.astype(np.float64)
    world_ras = nib.affines.apply_affine(fixed.affine, voxels)
    world_lps = nib.affines.apply_affine(RAS_TO_LPS_4 @ fixed.affine, voxels)
    moved_ras = world_ras + u_ras.reshape(-1, 3)
    moved_lps = world_lps + u_lps.reshape(-1, 3)
    np.testing.assert_allclose(nib.affines.apply_affine(RAS_TO_LPS_4, moved_lps),
                               moved_ras, atol=1e-3)
    moving_voxels = nib.affines.apply_affine(np.linalg.inv(RAS_TO_LPS_4 @ moving.affine),
                                             moved_lps)
    resampled = ndimage.map_coordinates(np.asarray(moving.dataobj, np.float64),
                                        moving_voxels.T, order=1, mode="nearest")
    warped = nib.load(registered["lps"] / "warped.nii.gz").get_fdata().reshape(-1)
    np.testing.assert_allclose(resampled, warped, atol=1e-2)


def test_flow_space_round_trip(rng):
    field = rng.normal(0, 3, (4, 5, 6, 3)).astype(np.float32)
    lps = warp.to_flow_space(field, "lps")
    np.testing.assert_array_equal(lps[..., 2], field[..., 2])
    np.testing.assert_array_equal(lps[..., :2], -field[..., :2])
    np.testing.assert_array_equal(warp.from_flow_space(lps, "lps"), field)
    np.testing.assert_array_equal(warp.to_flow_space(field, "ras"), field)


@pytest.mark.parametrize("isal, level", [(True, 0), (True, 1), (False, 0), (False, 1)])
def test_save_image_writes_gzip_any_reader_opens(isal, level, tmp_path, monkeypatch):
    """ISA-L's gzip (compressed at any level) or, without the package, zlib's at the
    level asked (0: stored); Python's own zlib-based reader opens both."""
    import gzip
    import sys
    if not isal:
        monkeypatch.setitem(sys.modules, "isal", None)            # import isal fails
    data = np.zeros((20, 21, 22, 1, 3), np.float32)
    data[5:15, 5:15, 5:15] = np.linspace(-3.0, 3.0, 1000 * 3, dtype=np.float32).reshape(
        10, 10, 10, 1, 3)
    image = warp.nifti_like(nib.Nifti1Image(np.zeros(data.shape[:3], np.float32),
                                            np.diag([1.0, 2.0, 3.0, 1.0])), data,
                            intent="vector", intent_name="displacement LPS")
    path = str(tmp_path / "flow.nii.gz")
    warp.save_image(image, path, level)
    with gzip.open(path) as handle:                                # a plain gzip stream
        assert len(handle.read()) == 352 + data.nbytes
    read = nib.load(path)
    np.testing.assert_array_equal(np.asarray(read.dataobj), data)
    assert read.header.get_intent() == ("vector", (), "displacement LPS")
    stored = not isal and level == 0
    assert (os.path.getsize(path) > data.nbytes) == stored


def test_moving_voxels_match_the_affines_in_float64(rng):
    """Mov^-1 (F x + u(x)) for oblique grids, whole or by slab into a given buffer."""
    shape = (7, 8, 9)
    fixed_affine = np.array([[0.9, -0.3, 0.0, -40.0], [0.3, 0.9, 0.1, 25.0],
                             [0.0, -0.1, 1.2, 10.0], [0.0, 0.0, 0.0, 1.0]])
    moving_affine = np.array([[0.0, 2.0, 0.0, 30.0], [-1.5, 0.0, 0.2, -12.0],
                              [0.0, 0.0, 1.1, 5.0], [0.0, 0.0, 0.0, 1.0]])
    field = rng.normal(0.0, 4.0, (*shape, 3)).astype(np.float32)
    voxels = np.indices(shape).reshape(3, -1).T.astype(np.float64)
    world = nib.affines.apply_affine(fixed_affine, voxels) + field.reshape(-1, 3)
    expected = nib.affines.apply_affine(np.linalg.inv(moving_affine), world).reshape(
        *shape, 3)
    points = warp.moving_voxels(field, fixed_affine, moving_affine)
    assert points.dtype == np.float32
    np.testing.assert_allclose(points, expected, atol=1e-4)
    buffer = np.empty((3, *shape[1:], 3), np.float32)
    slab = warp.moving_voxels(field[2:5], fixed_affine, moving_affine, 2, shape, out=buffer)
    assert slab is buffer
    np.testing.assert_allclose(buffer, expected[2:5], atol=1e-4)


def test_flow_image_in_place_stores_the_field_itself(rng):
    reference = nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), np.eye(4))
    field = rng.normal(0, 3, (4, 5, 6, 3)).astype(np.float32)
    expected = warp.to_flow_space(field, "lps")
    copied = warp.flow_image(reference, field, "lps")
    assert not np.shares_memory(np.asarray(copied.dataobj), field)
    image = warp.flow_image(reference, field, "lps", in_place=True)
    data = np.asarray(image.dataobj)
    assert np.shares_memory(data, field)
    np.testing.assert_array_equal(data[:, :, :, 0], expected)
    np.testing.assert_array_equal(np.asarray(copied.dataobj), data)
    assert image.header.get_intent() == ("vector", (), "displacement LPS")


def test_jacobian_image_is_the_world_volume_change(registered, pair):
    """numpy reference: det(I + du/dp) with du/dp from np.gradient over voxel indices and
    the chain rule through the (rotated) fixed affine."""
    flow = nib.load(registered["ras"] / "flow.nii.gz")
    field = flow.get_fdata()[:, :, :, 0]                          # [X, Y, Z, 3] mm
    by_voxel = np.stack(np.gradient(field, axis=(0, 1, 2)), axis=-1)  # du_i / dv_j
    gradient = by_voxel @ np.linalg.inv(flow.affine[:3, :3])      # du_i / dp_k
    expected = np.linalg.det(np.eye(3) + gradient)
    written = nib.load(registered["ras"] / "jacobian.nii.gz")
    np.testing.assert_allclose(written.get_fdata(), expected, atol=1e-3)
    np.testing.assert_allclose(written.affine, nib.load(pair["fixed"]).affine, atol=1e-6)


def test_nearest_keeps_an_int16_label_map_int16(tmp_path):
    labels = np.zeros((6, 5, 4), np.int16)
    labels[3:5, 1:3, 1:3] = 7
    nib.save(nib.Nifti1Image(labels, np.eye(4)), tmp_path / "labels.nii.gz")
    warp.flow_image(nib.load(tmp_path / "labels.nii.gz"), np.zeros((6, 5, 4, 3), np.float32)
                    ).to_filename(tmp_path / "flow.nii.gz")
    assert warp_cli.main(["--flow", str(tmp_path / "flow.nii.gz"), "--image",
                          str(tmp_path / "labels.nii.gz"), "--out", str(tmp_path / "w.nii"),
                          "--interpolation", "nearest"]) == 0
    result = nib.load(tmp_path / "w.nii")
    assert result.get_data_dtype() == np.int16
    np.testing.assert_array_equal(np.asarray(result.dataobj), labels)


def test_nearest_keeps_values_and_dtype(tmp_path):
    """A pure shift of 2 voxels along x (1 mm voxels): nearest = the shifted labels."""
    labels = np.zeros((6, 5, 4), np.uint16)
    labels[3:5, 1:3, 1:3] = 40000
    image = nib.Nifti1Image(labels, np.eye(4))
    field = np.zeros((6, 5, 4, 3), np.float32)
    field[..., 0] = 2.0
    nib.save(image, tmp_path / "labels.nii.gz")
    warp.flow_image(image, field).to_filename(tmp_path / "flow.nii.gz")
    assert warp_cli.main(["--flow", str(tmp_path / "flow.nii.gz"), "--image",
                      str(tmp_path / "labels.nii.gz"), "--out", str(tmp_path / "w.nii.gz"),
                      "--interpolation", "nearest"]) == 0
    result = nib.load(tmp_path / "w.nii.gz")
    assert result.get_data_dtype() == np.uint16
    expected = np.zeros_like(labels)
    expected[1:3, 1:3, 1:3] = 40000
    np.testing.assert_array_equal(np.asarray(result.dataobj), expected)


@pytest.mark.parametrize("case, expected", [
    ("not_a_flow", "expected [X, Y, Z, 1, 3]"),
    ("exists", "--overwrite"),
    ("missing", "flow file not found"),
    ("bad_suffix", ".nii or .nii.gz"),
    ("no_folder", "does not exist or is not writable"),
])
def test_errors_are_one_line_and_write_nothing(case, expected, registered, pair, tmp_path,
                                               capsys):
    flow, out = str(registered["ras"] / "flow.nii.gz"), str(tmp_path / "out.nii.gz")
    if case == "not_a_flow":
        flow = pair["moving"]
    elif case == "exists":
        open(out, "w").close()
    elif case == "missing":
        flow = str(tmp_path / "absent.nii.gz")
    elif case == "bad_suffix":
        out = str(tmp_path / "out.png")
    elif case == "no_folder":
        out = str(tmp_path / "absent" / "out.nii.gz")
    before = sorted(os.listdir(tmp_path))
    assert warp_cli.main(["--flow", flow, "--image", pair["moving"], "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert sorted(os.listdir(tmp_path)) == before


ANTS_SCRIPT = """
import sys
import ants
import numpy as np
fixed, moving, flow, out = sys.argv[1:5]
result = ants.apply_transforms(fixed=ants.image_read(fixed), moving=ants.image_read(moving),
                               transformlist=[flow], interpolator="linear")
np.save(out, result.numpy())
"""


def _ants_python():
    """A Python that imports antspyx: this one, or the one named by ALDK_ANTS_PYTHON."""
    import importlib.util
    import sys
    if importlib.util.find_spec("ants") is not None:
        return sys.executable
    return os.environ.get("ALDK_ANTS_PYTHON")


def test_ants_reproduces_warped_from_the_default_flow(registered, pair, tmp_path):
    """antsApplyTransforms reads register's default flow.nii.gz (LPS) as is and gives
    warped.nii.gz (the oblique fixed grid and the shifted moving grid included)."""
    import subprocess
    python = _ants_python()
    if python is None:
        pytest.skip("antspyx not installed (set ALDK_ANTS_PYTHON to a Python that has it)")
    out = tmp_path / "ants.npy"
    subprocess.run([python, "-c", ANTS_SCRIPT, pair["fixed"], pair["moving"],
                    str(registered["lps"] / "flow.nii.gz"), str(out)], check=True,
                   capture_output=True, timeout=600)
    expected = nib.load(registered["lps"] / "warped.nii.gz").get_fdata()
    np.testing.assert_allclose(np.load(out), expected, atol=1e-3 * np.abs(expected).max())
