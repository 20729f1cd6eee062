"""The embedded demo dataset, built offline from anatomy that nilearn ships.

Source: the ICBM 2009a nonlinear symmetric T1 template (skull-stripped, 1 mm, RAS) with its
grey- and white-matter probability maps, read from nilearn's package data by
``nilearn.datasets.load_mni152_template`` / ``load_mni152_gm_template`` /
``load_mni152_wm_template`` (no download). Tissue probabilities: GM and WM as given,
CSF = 1 - GM - WM inside the brain (T1 > 0), background outside; labels are their argmax
(0 background, 1 CSF, 2 GM, 3 WM). The brain's bounding box is cropped and resampled to
``size``³ (:mod:`aldk_tf.data.preprocess`).

Each synthetic subject is the template warped (:func:`aldk_tf.spatial.warp`) by a random
smooth deformation: a stationary velocity field (cubic-spline interpolated 5³ control grid)
integrated by scaling and squaring, composed with a random affine map (rotation, scaling,
translation). Tissue probabilities are warped by the same field and their argmax is the
subject's segmentation; six template landmarks (fixed MNI coordinates) are carried along
by solving ``q + flow(q) = p`` (:func:`aldk_tf.data.augment.transform_points`). Intensity
changes follow: a smooth multiplicative bias field, a gamma contrast change, a global gain
and Gaussian noise. Every random number comes from ``numpy.random.default_rng([seed,
subject])``, so a subject depends only on the seed, its index and the size.

With ``vary=True`` every subject is first made a different brain
(:func:`aldk_tf.data.anatomy.vary_anatomy`: tissue maps reweighted by smooth random
fields, the image re-synthesised with random T1-like contrast and blur), so a network
cannot learn one template's anatomy. ``test_template`` builds the test subjects from
another skull-stripped T1 (e.g. the older MNI152 linear average ``avg152T1_brain``), whose
tissue maps come from a Gaussian mixture of its intensities: a held-out anatomy.
Without either, all subjects derive from one template: test subjects share its anatomy
with the training subjects (unseen deformations, not unseen brains).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tensorflow as tf

from aldk_tf import spatial

from .anatomy import template_from_t1, vary_anatomy
from .augment import transform_points, upsample_control
from . import checks
from .dataset_config import write_dataset_config
from .hdf5 import DatasetWriter
from .preprocess import (PreprocessSettings, bounding_box, box_affine, load_image,
                         resample_box)

TISSUES = {"CSF": 1, "GM": 2, "WM": 3}
# Six landmarks in MNI space (mm, RAS), spread over both hemispheres and the midline.
LANDMARKS_MNI = np.array([[-30.0, 20.0, 35.0], [30.0, 20.0, 35.0],
                          [-35.0, -60.0, 20.0], [35.0, -60.0, 20.0],
                          [0.0, -20.0, 10.0], [0.0, -55.0, -30.0]])
VELOCITY_STD = 0.03          # std of the velocity control values, times size (voxels)
SQUARINGS = 6
MAX_ROTATION_DEG = 10.0
SCALE_RANGE = (0.9, 1.1)
MAX_SHIFT = 0.03             # translation, fraction of size
BIAS_STD = 0.12              # std of the log bias field's control values
GAMMA_RANGE = (0.75, 1.35)
GAIN_RANGE = (0.9, 1.1)
NOISE_RANGE = (0.005, 0.025)
MARGIN = 8                   # voxels (mm) around the brain's bounding box
MAX_FLOW_SIZE = 64           # deformations are integrated at most at 64^3, then resized


def preprocessing(size: int) -> PreprocessSettings:
    """How the demo's scans were prepared, as ``register`` reproduces it on a new
    skull-stripped T1: the brain's (non-zero) bounding box plus :data:`MARGIN` voxels (mm
    on the 1 mm template), intensities from 0 to the scan's maximum (the template is
    max-normalised), resampled to ``size``³. Stored as the dataset JSON's
    ``"preprocessing"``."""
    return PreprocessSettings(modality="mr", crop="nonzero", margin=MARGIN,
                              intensity="max", size=(size,) * 3)


def load_template(size: int, t1_path=None) -> dict:
    """The cropped template at ``size``³: T1 in [0, 1], tissue probabilities, labels.

    Default: nilearn's ICBM 2009a with its GM/WM maps. ``t1_path``: a skull-stripped T1
    NIfTI in MNI space, tissue maps from :func:`template_from_t1`.
    """
    if t1_path is None:
        t1_image, probabilities, brain = _icbm_2009a()
        t1 = np.asarray(t1_image.get_fdata(), np.float32)
    else:
        import nibabel as nib
        t1_image = nib.as_closest_canonical(load_image(t1_path, "held-out T1"))
        built = template_from_t1(t1_image.get_fdata())
        t1, brain = built["t1"], built["labels"] > 0
        probabilities = list(np.moveaxis(built["probabilities"], -1, 0))

    start, stop = bounding_box(brain, MARGIN, where="MNI152 template brain")
    shape = (size,) * 3
    t1 = np.clip(resample_box(t1, start, stop, shape, order=1), 0.0, 1.0)
    probabilities = np.stack([resample_box(p.astype(np.float32), start, stop, shape, 1)
                              for p in probabilities], axis=-1)
    affine = box_affine(t1_image.affine, start, stop, shape)
    landmarks = (np.linalg.inv(affine) @ np.c_[LANDMARKS_MNI, np.ones(6)].T)[:3].T
    return {"t1": t1.astype(np.float32), "probabilities": probabilities.astype(np.float32),
            "labels": np.argmax(probabilities, axis=-1).astype(np.uint8),
            "affine": affine, "landmarks": landmarks.astype(np.float32)}


def _icbm_2009a():
    """nilearn's ICBM 2009a T1 image, tissue maps (background, CSF, GM, WM), brain mask."""
    from nilearn.datasets import (load_mni152_gm_template, load_mni152_template,
                                  load_mni152_wm_template)

    t1_image = load_mni152_template()
    brain = np.asarray(t1_image.get_fdata()) > 0
    gm = np.clip(load_mni152_gm_template().get_fdata(), 0.0, 1.0).astype(np.float32)
    wm = np.clip(load_mni152_wm_template().get_fdata(), 0.0, 1.0).astype(np.float32)
    over = np.maximum(gm + wm, 1.0)
    gm, wm = gm / over * brain, wm / over * brain
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0) * brain
    return t1_image, [1.0 - brain, csf, gm, wm], brain


def _rotation(angles) -> np.ndarray:
    matrix = np.eye(3)
    for axis, angle in enumerate(angles):
        i, j = [a for a in range(3) if a != axis]
        turn = np.eye(3)
        turn[i, i] = turn[j, j] = np.cos(angle)
        turn[i, j], turn[j, i] = -np.sin(angle), np.sin(angle)
        matrix = matrix @ turn
    return matrix


def random_deformation_parameters(rng: np.random.Generator, size: int) -> dict:
    """Velocity control grid ``[1, 5, 5, 5, 3]`` and affine ``(matrix, shift)`` (voxels)."""
    control = rng.normal(0.0, VELOCITY_STD * size, (1, 5, 5, 5, 3))
    angles = np.deg2rad(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG, 3))
    matrix = _rotation(angles) @ np.diag(rng.uniform(*SCALE_RANGE, 3)) - np.eye(3)
    shift = rng.uniform(-MAX_SHIFT, MAX_SHIFT, 3) * size
    return {"control": control.astype(np.float32),
            "matrix": matrix[None].astype(np.float32),
            "shift": shift[None].astype(np.float32)}


def deformation(control: tf.Tensor, matrix: tf.Tensor, shift: tf.Tensor,
                size: int) -> tf.Tensor:
    """Flow ``[1, S, S, S, 3]``: exp of the velocity (scaling and squaring), then affine.

    ``control`` and ``shift`` are in voxels of ``size``. Above :data:`MAX_FLOW_SIZE` the
    flow is computed at ``size`` halved until it is no larger (while it stays even) and
    upsampled (the field is smooth; this saves time).
    """
    work = size
    while work > MAX_FLOW_SIZE and work % 2 == 0:
        work //= 2
    factor = work / size
    shape = (work,) * 3
    flow = upsample_control(control * factor, shape) / 2.0 ** SQUARINGS
    for _ in range(SQUARINGS):
        flow = spatial.compose(flow, flow)
    flow = spatial.compose(spatial.affine_flow(matrix, shift * factor, shape), flow)
    return flow if work == size else spatial.upsample_flow(flow, size // work)


@tf.function
def _deform_template(t1, probabilities, landmarks, control, matrix, shift):
    flow = deformation(control, matrix, shift, t1.shape[1])
    return (spatial.warp(t1, flow), spatial.warp(probabilities, flow),
            transform_points(landmarks, flow))


def make_subject(template: dict, seed: int, index: int, vary: bool = False) -> dict:
    """One synthetic subject: ``{volume, segmentation, point, attrs}`` (RCN scan layout).

    ``vary``: a different brain first (:func:`vary_anatomy`, its own random stream, so the
    deformation and intensity draws are those of the unvaried subject).
    """
    rng = np.random.default_rng([seed, index])
    size = template["t1"].shape[0]
    if vary:
        template = vary_anatomy(template, np.random.default_rng([seed, index, 1]))
    parameters = random_deformation_parameters(rng, size)
    t1, probabilities, points = _deform_template(
        template["t1"][None, ..., None], template["probabilities"][None],
        template["landmarks"][None], parameters["control"], parameters["matrix"],
        parameters["shift"])
    log_bias = upsample_control(rng.normal(0.0, BIAS_STD, (1, 4, 4, 4, 1)), (size,) * 3)
    image = t1.numpy()[0, ..., 0] ** rng.uniform(*GAMMA_RANGE)
    image = image * np.exp(log_bias.numpy()[0, ..., 0]) * rng.uniform(*GAIN_RANGE)
    image = image + rng.normal(0.0, rng.uniform(*NOISE_RANGE), image.shape)
    volume = np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    return {"volume": volume,
            "segmentation": np.argmax(probabilities.numpy()[0], axis=-1).astype(np.uint8),
            "point": points.numpy()[0].astype(np.float32),
            "attrs": {"affine": template["affine"], "seed": seed, "subject": index}}


def build_demo(out_dir="datasets", size: int = 64, seed: int = 0, subjects: int = 20,
               validation: int = 4, test: int = 4, log=print, vary: bool = False,
               test_template=None, group_size: int = 0,
               heldout_validation: bool = False) -> Path:
    """Write ``out_dir/demo.h5`` and ``out_dir/demo.json``; returns the JSON path.

    Subjects ``0 .. n-1`` are split in order: training first, then ``validation``, then
    ``test`` (never used for training). Schemes: "1" training, "2" validation, "test".
    ``vary``: every subject a different brain (see module docstring). ``test_template``:
    path of a skull-stripped T1 in MNI space the test subjects are built from instead.
    ``group_size`` > 0: the training subjects are split into subsets of that many
    (``demo-train-00``, ...; the last takes any remainder), each its own stream of scheme
    "1", so training pairs are drawn within a group only: many subjects with few pairs
    (teacher flows are stored per pair). ``heldout_validation``: the validation subjects
    come from ``test_template`` too (for runs that train on generated pairs of the
    default template and choose settings on the held-out anatomy).
    """
    train = subjects - validation - test
    checks.check_network_size("--size", size)
    if validation < 2 or test < 2 or train < 2:
        # A subset of one subject gives no pair (pairs are two different scans).
        raise ValueError(f"need at least 2 training, 2 validation and 2 test subjects "
                         f"(a pair each), got {subjects} subjects, {validation} "
                         f"validation, {test} test")
    if group_size == 1 or group_size < 0:
        raise ValueError(f"group_size must be 0 (one training subset) or at least 2, "
                         f"got {group_size}")
    out_dir = Path(out_dir)
    template = load_template(size)
    held_out = load_template(size, test_template) if test_template else template
    ids = [f"subject_{index:02d}" for index in range(subjects)]
    with DatasetWriter(out_dir / "demo.h5") as writer:
        for index, scan_id in enumerate(ids):
            first_heldout = train if heldout_validation else train + validation
            source = held_out if index >= first_heldout else template
            writer.add(scan_id, **make_subject(source, seed, index, vary))
            if log:
                log(f"[{index + 1}/{subjects}] {scan_id}")
    entries = [f"demo/{scan_id}" for scan_id in ids]
    description = (f"Synthetic subjects deformed from nilearn's MNI152 ICBM 2009a template "
                   f"(T1 + GM/WM maps), size {size}, seed {seed}"
                   + (", anatomy varied per subject" if vary else "")
                   + (f", {'validation and ' if heldout_validation else ''}test subjects "
                      f"from {Path(test_template).name}" if test_template else "")
                   + "; built by aldk_tf.data.demo_set")
    training = training_subsets(entries[:train], group_size)
    config = write_dataset_config(
        out_dir / "demo.json", files={"demo": {"type": "HDF5", "path": "demo.h5"}},
        subsets={**training, "demo-val": entries[train:train + validation],
                 "demo-test": entries[train + validation:]},
        schemes={"1": {name: round(1.0 / len(training), 6) for name in training},
                 "2": {"demo-val": 1.0}, "test": {"demo-test": 1.0}},
        image_size=(size,) * 3, image_type="brain", segmentation_class_value=dict(TISSUES),
        description=description, preprocessing=preprocessing(size).to_dict())
    config.validate(check_labels=True)
    return config.path


def training_subsets(entries: list[str], group_size: int) -> dict[str, list[str]]:
    """``{"demo-train": entries}``, or consecutive groups of ``group_size`` entries (a
    remainder too small to pair joins the last group)."""
    if group_size <= 0 or group_size >= len(entries):
        return {"demo-train": list(entries)}
    groups = [list(entries[start:start + group_size])
              for start in range(0, len(entries), group_size)]
    if len(groups) > 1 and len(groups[-1]) < 2:
        remainder = groups.pop()
        groups[-1] = groups[-1] + remainder
    return {f"demo-train-{index:02d}": group for index, group in enumerate(groups)}


def summary(json_path) -> str:
    """One line describing a built demo dataset."""
    data = json.loads(Path(json_path).read_text())
    counts = ", ".join(f"{name} {len(v)}" for name, v in data["subsets"].items())
    return f"{json_path}: {counts}; image_size {data['image_size']}"


def write_nifti_subjects(json_path, out_dir, count: int = 2) -> list[Path]:
    """The first ``count`` test subjects of a built demo set as NIfTI files (T1 and labels,
    world coordinates from the stored affine): inputs for trying ``register``."""
    import h5py
    import nibabel as nib
    json_path = Path(json_path)
    data = json.loads(json_path.read_text())
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with h5py.File(json_path.parent / "demo.h5", "r") as handle:
        for entry in data["subsets"]["demo-test"][:count]:
            scan_id = entry.split("/", 1)[1]
            group = handle[scan_id]
            affine = np.asarray(group.attrs["affine"], np.float64)
            for key, suffix in (("volume", "t1"), ("segmentation", "seg")):
                path = out_dir / f"{scan_id}_{suffix}.nii.gz"
                image = nib.Nifti1Image(np.asarray(group[key]), affine)
                temporary = path.with_name(".tmp-" + path.name)
                nib.save(image, temporary)
                temporary.replace(path)
                written.append(path)
    return written
