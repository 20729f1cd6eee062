"""Meaningless input is refused (or loudly warned) by the first tool that can see it.

One group per class of ``aldk_tf/data/checks.py`` (the table: docs/faults.md): degenerate
geometry, degenerate content, degenerate pairing, labels no scan has, sizes no network
takes. Each case runs the tool's ``main`` and checks the exit status, the one ``error:``
line (no traceback) and that nothing was written; every one of them was accepted before.
"""

import json
import os

import nibabel as nib
import numpy as np
import pytest

from aldk_tf.cli import nifti_to_h5
from aldk_tf.cli import train as train_cli
from aldk_tf.data import checks

from scripts import one_error_line
from synthetic import write_blob_dataset

SHAPE = (20, 20, 16)


def scan(rng, shape=SHAPE):
    """A textured volume (a body of noise in air): many distinct values, like a scan."""
    data = np.zeros(shape, np.float32)
    inner = tuple(slice(2, max(n - 2, 3)) for n in shape)
    data[inner] = rng.uniform(20, 200, data[inner].shape)
    return data


def save(path, data, affine=None):
    nib.save(nib.Nifti1Image(data, np.diag([1.2, 1.2, 1.5, 1]) if affine is None
                             else affine), str(path))
    return str(path)


def with_header(path, data, **fields):
    """A NIfTI (``.nii``) whose header fields are set as given, byte for byte (nibabel
    would "fix" a zero or negative pixdim when it writes the file)."""
    image = nib.Nifti1Image(data, np.diag([1.2, 1.2, 1.5, 1]))
    header = image.header
    for name, value in fields.items():
        header[name] = value
    path = str(path)
    nib.save(nib.Nifti1Image(data, None, header=header.copy()), path)
    with open(path, "r+b") as handle:           # the header exactly as set above
        handle.write(header.binaryblock)
    return path


def prep(tmp_path, images, *flags, labels=None):
    out = tmp_path / "out" / "set"
    argv = ["--images", *images, "--out", str(out), "--size", "16", *flags]
    if labels:
        argv += ["--labels", *labels]
    return nifti_to_h5.main(argv), out


def assert_nothing_written(out):
    assert not out.parent.exists() or not list(out.parent.iterdir())


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def scans(tmp_path, rng):
    """Four good scans in ``tmp_path/images``."""
    folder = tmp_path / "images"
    folder.mkdir()
    return [save(folder / f"s{i}.nii.gz", scan(rng)) for i in range(4)]


# ------------------------------------------------------------------ geometry
@pytest.mark.parametrize("fault, expected", [
    ("one slice", "expected a 3-D scan"),
    ("zero spacing", "affine gives voxel sizes"),
    ("nan spacing", "affine"),
    ("negative pixdim", "header gives voxel sizes -1.2"),
    ("zero pixdim", "header gives voxel sizes 1.2 x 0"),
    ("content one slice thick", "the content spans only")])
def test_degenerate_geometry_is_refused_by_prep(tmp_path, rng, scans, capsys, fault,
                                                expected):
    bad = tmp_path / "bad.nii"
    if fault == "one slice":
        save(bad, scan(rng, (40, 40, 1)))
    elif fault == "zero spacing":
        with_header(bad, scan(rng), srow_y=[0, 0, 0, 0], qform_code=0, sform_code=1)
    elif fault == "nan spacing":
        with_header(bad, scan(rng), srow_x=[np.nan, 0, 0, 0], qform_code=0, sform_code=1)
    elif fault == "negative pixdim":
        with_header(bad, scan(rng), pixdim=[1, -1.2, 1.2, 1.5, 1, 1, 1, 1], sform_code=0,
                    qform_code=1)
    elif fault == "zero pixdim":
        with_header(bad, scan(rng), pixdim=[1, 1.2, 0, 1.5, 1, 1, 1, 1], sform_code=0,
                    qform_code=1)
    else:
        data = np.zeros(SHAPE, np.float32)
        data[:, :, 7] = rng.uniform(20, 200, SHAPE[:2])
        save(bad, data)
    code, out = prep(tmp_path, [*scans, str(bad)])
    assert code == 2
    one_error_line(capsys, str(bad), expected)
    assert_nothing_written(out)


def test_a_flow_without_voxel_sizes_is_refused_by_warp(tmp_path, rng, capsys):
    from aldk_tf.cli import warp as warp_cli
    flow = with_header(tmp_path / "flow.nii", np.zeros(SHAPE + (1, 3), np.float32),
                       srow_z=[0, 0, 0, 0], qform_code=0, sform_code=1, intent_code=1006)
    image = save(tmp_path / "image.nii.gz", scan(rng))
    out = tmp_path / "warped.nii.gz"
    assert warp_cli.main(["--flow", flow, "--image", image, "--out", str(out),
                          "--flow-space", "ras"]) == 2
    one_error_line(capsys, flow, "voxel sizes")
    assert not out.exists()


# ------------------------------------------------------------------ content
@pytest.mark.parametrize("fault, expected", [
    ("blank", "every voxel of the image is 0"),
    ("constant", "every voxel of the image is 7"),
    ("label map", "looks like a label map"),
    ("binary mask", "looks like a label map"),
    ("many smooth labels", "looks like a label map")])
def test_degenerate_content_is_refused_by_prep(tmp_path, rng, scans, capsys, fault,
                                               expected):
    bad = tmp_path / "bad.nii.gz"
    data = np.zeros(SHAPE, np.float32)
    if fault == "constant":
        data[:] = 7
    elif fault == "label map":
        data[2:18, 2:18, 2:14] = rng.integers(0, 4, (16, 16, 12))
    elif fault == "binary mask":
        data[4:15, 3:16, 2:12] = 1
    elif fault == "many smooth labels":        # 40 labels in blocks (a parcellation)
        data = np.kron(np.arange(40).reshape(2, 4, 5) % 40,
                       np.ones((10, 5, 4))).astype(np.float32)[:, :, :16]
    save(bad, data)
    code, out = prep(tmp_path, [*scans, str(bad)], "--crop", "none")
    assert code == 2
    one_error_line(capsys, str(bad), expected)
    assert_nothing_written(out)


def test_a_float_or_intensity_label_map_is_refused_not_rounded(tmp_path, rng, scans,
                                                               capsys):
    labels = tmp_path / "labels"
    labels.mkdir()
    paths = []
    for index, path in enumerate(scans):
        data = np.zeros(SHAPE, np.float32)
        data[4:16, 4:16, 3:12] = 1
        if index == 2:
            data = data * 1.5                          # 1.5: not a label
        paths.append(save(labels / os.path.basename(path), data))
    code, out = prep(tmp_path, scans, labels=[str(labels)])
    assert code == 2
    one_error_line(capsys, paths[2], "not integer labels")
    assert_nothing_written(out)
    # An intensity image (2000 integer values) given as a label map.
    save(paths[2], np.rint(scan(rng) * 10))
    code, out = prep(tmp_path, scans, labels=[str(labels)])
    assert code == 2
    one_error_line(capsys, paths[2], "distinct values; expected a label map")


def test_a_label_map_warped_linearly_is_warned(tmp_path, rng, capsys):
    from aldk_tf.cli import warp as warp_cli
    flow = save(tmp_path / "flow.nii.gz", np.zeros(SHAPE + (1, 3), np.float32))
    labels = np.zeros(SHAPE, np.float32)
    labels[4:12, 4:12, 4:10], labels[12:16, 4:12, 4:10] = 1, 2
    image = save(tmp_path / "labels.nii.gz", labels)
    out = tmp_path / "warped.nii.gz"
    assert warp_cli.main(["--flow", flow, "--image", image, "--out", str(out),
                          "--flow-space", "ras"]) == 0
    err = capsys.readouterr().err
    assert f"warning: {image}: looks like a label map" in err and "--interpolation labels" \
        in err
    assert warp_cli.main(["--flow", flow, "--image", save(tmp_path / "i.nii.gz",
                                                            scan(rng)),
                          "--out", str(tmp_path / "w2.nii.gz"), "--flow-space", "ras"]) == 0
    assert "warning" not in capsys.readouterr().err


# ------------------------------------------------------------------ pairing
@pytest.mark.parametrize("flags", [["--val", "1"], ["--test", "1"],
                                   ["--val", "2", "--test", "1"], ["--val", "3"]])
def test_a_split_that_gives_no_pair_is_refused_by_prep(tmp_path, scans, capsys, flags):
    code, out = prep(tmp_path, scans, *flags)
    assert code == 2
    one_error_line(capsys, "--", "pair")
    assert_nothing_written(out)


def test_the_same_scan_twice_is_refused_by_prep(tmp_path, rng, scans, capsys):
    copy = tmp_path / "copy.nii.gz"
    copy.write_bytes(open(scans[1], "rb").read())
    code, out = prep(tmp_path, [*scans, str(copy)])
    assert code == 2
    one_error_line(capsys, str(copy), scans[1], "different scans")
    assert_nothing_written(out)


def hand_written_dataset(tmp_path, edit):
    """The blob set's JSON edited by ``edit(document)`` and written as the tools of
    earlier versions (or a hand) could (write_dataset_config would refuse it)."""
    path = write_blob_dataset(str(tmp_path / "data"), size=16, train=3, validation=2,
                              test=2)
    document = json.load(open(path))
    edit(document)
    with open(path, "w") as handle:
        json.dump(document, handle)
    return path


def train_flags(dataset, weights):
    return ["-b", "LDR", "-d", dataset, "--batch", "1", "--round", "2", "--epochs", "1",
            "--output", "x", "--weights-dir", str(weights), "--validate-every", "0",
            "--channels", "4", "--verbose", "0"]


@pytest.mark.parametrize("fault, expected", [
    ("validation of one scan", "subsets['validation'] (scheme '2') gives no pair"),
    ("test of one scan", "subsets['test'] (scheme 'test') gives no pair"),
    ("a scan listed twice", "lists 'blobs/train00' more than once"),
    ("labels no scan has", "segmentation_class_value {'vessel': 7} absent"),
    ("labels read as binary", "read as binary 0/255 masks")])
def test_a_meaningless_dataset_is_refused_by_training(tmp_path, capsys, fault, expected):
    """Refused before a step, even with --validate-every 0 (the subsets were only
    noticed when validating, and the labels never)."""
    def edit(document):
        if fault == "validation of one scan":
            document["subsets"]["validation"] = document["subsets"]["validation"][:1]
        elif fault == "test of one scan":
            document["subsets"]["test"] = document["subsets"]["test"][:1]
        elif fault == "a scan listed twice":
            document["subsets"]["train"].append("blobs/train00")
        elif fault == "labels no scan has":
            document["segmentation_class_value"]["vessel"] = 7
        else:
            del document["segmentation_class_value"]
    dataset = hand_written_dataset(tmp_path, edit)
    weights = tmp_path / "weights"
    assert train_cli.main(train_flags(dataset, weights)) == 2
    one_error_line(capsys, expected)
    assert not weights.exists()


def test_labels_no_scan_has_are_refused_by_evaluate(student_run_32, demo_dataset_32,
                                                    tmp_path, capsys):
    from aldk_tf.cli import evaluate as evaluate_cli
    document = json.load(open(demo_dataset_32))
    document["segmentation_class_value"]["tumour"] = 9
    document["files"]["demo"]["path"] = os.path.join(os.path.dirname(demo_dataset_32),
                                                     "demo.h5")
    dataset = tmp_path / "demo.json"
    dataset.write_text(json.dumps(document))
    out = tmp_path / "reports"
    assert evaluate_cli.main(["-c", student_run_32, "-d", str(dataset), "-v", "demo-test",
                              "--out", str(out), "--no-progress"]) == 2
    one_error_line(capsys, str(dataset), "{'tumour': 9} absent")
    assert not out.exists()


def test_a_dataset_with_a_subset_of_one_scan_is_not_written(tmp_path):
    from aldk_tf.data import DataError, write_dataset_config
    with pytest.raises(DataError, match="gives no pair"):
        write_dataset_config(tmp_path / "x.json", files={"a": {"path": "a.h5"}},
                             subsets={"train": ["a/1", "a/2"], "val": ["a/3"]},
                             schemes={"1": {"train": 1.0}, "2": {"val": 1.0}},
                             image_size=(16, 16, 16))
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("moving", ["same file", "copy"])
def test_a_scan_registered_to_itself_is_refused(savedmodel_32, tmp_path, rng, capsys,
                                                moving):
    from aldk_tf.cli import register as register_cli
    data = np.zeros((40, 40, 40), np.float32)
    data[6:34, 6:34, 6:34] = rng.uniform(20, 200, (28, 28, 28))
    fixed = save(tmp_path / "fixed.nii.gz", data)
    other = fixed
    if moving == "copy":
        other = tmp_path / "copy.nii.gz"
        other.write_bytes(open(fixed, "rb").read())
        other = str(other)
    out = tmp_path / "out"
    assert register_cli.main(["--model", savedmodel_32, "--fixed", fixed, "--moving",
                              other, "--out", str(out)]) == 2
    one_error_line(capsys, other, fixed, "expected two different scans")
    assert not out.exists()


# ------------------------------------------------------------------ labels and sizes
def test_empty_label_maps_are_refused_by_prep(tmp_path, scans, capsys):
    labels = tmp_path / "labels"
    labels.mkdir()
    paths = [save(labels / os.path.basename(p), np.zeros(SHAPE, np.uint8)) for p in scans]
    code, out = prep(tmp_path, scans, labels=[str(labels)])
    assert code == 2
    one_error_line(capsys, "every label map is empty")
    assert_nothing_written(out)
    # One empty label map among labelled ones: written, with a warning naming it.
    data = np.zeros(SHAPE, np.uint8)
    data[4:12, 4:12, 4:10] = 3
    for path in paths[1:]:
        save(path, data)
    code, out = prep(tmp_path, scans, labels=[str(labels)])
    assert code == 0
    assert f"warning: {paths[0]}: the label map is empty" in capsys.readouterr().err


@pytest.mark.parametrize("size", ["30", "8", "24 32 32"])
def test_a_size_no_network_takes_is_refused_by_prep(tmp_path, scans, capsys, size):
    out = tmp_path / "out" / "set"
    assert nifti_to_h5.main(["--images", *scans, "--out", str(out), "--size",
                             *size.split()]) == 2
    one_error_line(capsys, f"--size {size}", "multiples of 16")
    assert_nothing_written(out)


def test_a_size_the_cross_resolution_student_cannot_take_is_warned(tmp_path, scans,
                                                                   capsys):
    out = tmp_path / "out" / "set"
    assert nifti_to_h5.main(["--images", *scans, "--out", str(out), "--size", "16"]) == 0
    assert "warning: --size 16: not a multiple of 32" in capsys.readouterr().err


def test_build_demo_refuses_a_size_no_network_takes_and_subsets_of_one(tmp_path, capsys):
    from aldk_tf.cli import build_demo
    for flags, expected in ((["--size", "24"], "--size 24"),
                            (["--val", "1"], "2 validation")):
        assert build_demo.main(["--out", str(tmp_path / "d"), "--subjects", "6",
                                "--test", "2", *flags]) == 2
        one_error_line(capsys, expected)
    assert not (tmp_path / "d").exists()


def test_the_networks_stride_is_the_size_the_checks_ask_for():
    from aldk_tf.networks.affine import AffineStem
    from aldk_tf.networks.student import StudentNet
    from aldk_tf.networks.voxelmorph import VoxelMorphNet
    from aldk_tf.networks.vtn import VTNNet
    assert {net.stride for net in (AffineStem, StudentNet, VoxelMorphNet, VTNNet)} == \
        {checks.SIZE_MULTIPLE}


def test_label_like_separates_label_maps_from_scans(rng):
    """An independent reference: the MNI template is a scan, its thresholded tissue
    classes a label map; a uint8 quantised scan stays a scan."""
    from nilearn import datasets
    template = np.asarray(datasets.load_mni152_template(resolution=2).dataobj, np.float64)
    assert checks.label_like(template) is None
    assert checks.label_like(np.rint(template / template.max() * 255)) is None
    classes = np.digitize(template, np.array([0.2, 0.5, 0.8]) * template.max())
    assert checks.label_like(classes) is not None
    ct = rng.normal(40, 20, (30, 30, 30)).round() - 1000 * (rng.random((30, 30, 30)) < .3)
    assert checks.label_like(ct) is None
