"""Register a new NIfTI pair with an exported model (the console script ``aldk-register``,
:mod:`aldk_tf.cli.register`).

Both scans go through the data preparation's preprocessing
(:func:`aldk_tf.data.preprocess.preprocess_scan`: RAS reorientation, crop box, intensities
to 0..255, resampling to the model's size) **with the settings the model's training data
was prepared with**: ``aldk-prep`` stores them in the dataset JSON, training copies them
into the run's ``config.json``, export into ``export_info.json``, where register reads
them. A flag overrides one setting (printed as a note); the modality cannot be changed,
and a request that cannot be prepared the same way (masks missing for a model trained
on masked scans, a label crop, a scan whose every voxel falls outside the window) is
refused with one line. Then the SavedModel's ``serving_default`` signature registers
them. Written to ``DIR``, on the fixed image's voxel grid with its affine (header copied
from the fixed file):

- ``warped.nii.gz``        the original moving image (its own intensities) resampled at
                           the corresponding points;
- ``flow.nii.gz``          the displacement ``u`` in millimetres, ``[X, Y, Z, 1, 3]``,
                           intent "vector", world RAS axes (``--flow-space lps``: ITK/ANTs
                           LPS axes; see :mod:`aldk_tf.deploy.warp`): the fixed voxel at world
                           position ``p`` corresponds to the moving image's ``p + u(p)``;
- ``jacobian.nii.gz``      det of the Jacobian of ``p -> p + u(p)`` (volume change; <= 0
                           is folding);
- ``warped_seg.nii.gz``    with ``--moving-seg``: labels warped one mask at a time
                           (trilinear, threshold 128 of 255, as the evaluation does), in
                           an integer type wide enough for the values (uint16 for 40000);
- ``preview.png``          orthogonal slices of fixed / moving / warped / Jacobian
                           determinant, on the model's grid;
- ``registration.json``    the model, the inputs, the preprocessing used, timings.

An existing non-empty ``DIR`` is refused unless ``--overwrite``; then it is replaced as
a whole (no file of a previous pair stays). ``aldk-warp`` applies ``flow.nii.gz`` to
other images. ``--pairs`` registers every row of a CSV with the model loaded once
(:mod:`aldk_tf.deploy.register_batch`). :class:`Registrar` is the in-memory interface (model
loaded once; nibabel images in and out).

With ``--refine N`` the SavedModel's flow is refined on the model's grid by N steps of
instance optimisation (:mod:`aldk_tf.training.refine`) before anything is written; the time it
took is printed (the first call includes tracing the refinement, about a second).

Correspondence: the network maps preprocessed fixed voxel ``v`` to preprocessed moving
voxel ``v + flow(v)``; each grid's affine (kept by the preprocessing) takes these to world
coordinates. Sampling uses :func:`aldk_tf.spatial.sample` (trilinear, edge-clamped).
All files are computed first in a temporary folder, which is then renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from aldk_tf.data import DataError, checks, preprocess  # noqa: E402
from aldk_tf.deploy import warp  # noqa: E402
from aldk_tf.deploy.preparation import (RegisterError, check_prepared,  # noqa: E402
                                        resolve_preprocessing, scan_crop)
from aldk_tf.deploy.export import make_readable, make_writable_folder  # noqa: E402
from aldk_tf.deploy.serving import INFO_NAME, SERVING_SIGNATURE  # noqa: E402
from aldk_tf.training.refine import DEFAULT_LEARNING_RATE  # noqa: E402
from aldk_tf.training.refine import check_arguments as check_refine_arguments  # noqa: E402

SUMMARY_NAME = "registration.json"
OUTPUT_NAMES = ("warped.nii.gz", "flow.nii.gz", "jacobian.nii.gz", "warped_seg.nii.gz",
                "preview.png", SUMMARY_NAME)


# ----------------------------------------------------------------------------- model
def load_serving_model(path: str):
    """``(loaded SavedModel, (D, H, W))`` of an exported SavedModel version directory.

    Keep the loaded object while calling ``loaded.signatures[...]``: the signatures only
    hold weak references to its variables.
    """
    import tensorflow as tf

    path = latest_version(path)
    if not os.path.isfile(os.path.join(path, "saved_model.pb")):
        raise RegisterError(f"{path}: not a SavedModel version directory (no "
                            "saved_model.pb); expected export/<name>/<N> from export.py")
    try:
        loaded = tf.saved_model.load(path)
    except Exception as error:  # noqa: BLE001  TF raises many types for broken models
        reason = " ".join(str(error).split())[:200]
        raise RegisterError(f"{path}: cannot load the SavedModel ({reason})") from None
    if SERVING_SIGNATURE not in loaded.signatures:
        raise RegisterError(f"{path}: no '{SERVING_SIGNATURE}' signature "
                            f"(has {sorted(loaded.signatures)})")
    signature = loaded.signatures[SERVING_SIGNATURE]
    _, inputs = signature.structured_input_signature
    if set(inputs) != {"fixed", "moving"}:
        raise RegisterError(f"{path}: '{SERVING_SIGNATURE}' takes {sorted(inputs)}, "
                            "expected fixed and moving")
    shape = inputs["fixed"].shape
    return loaded, tuple(int(n) for n in shape[1:4])


def latest_version(path: str) -> str:
    """``path`` itself, or its highest numeric version subdirectory when ``path`` is a
    model base directory (``export/<name>``), as TF Serving would pick."""
    if os.path.isfile(os.path.join(path, "saved_model.pb")) or not os.path.isdir(path):
        return path
    versions = [int(name) for name in os.listdir(path) if name.isdigit() and
                os.path.isfile(os.path.join(path, name, "saved_model.pb"))]
    return os.path.join(path, str(max(versions))) if versions else path


# ----------------------------------------------------------------------------- outputs
def write_preview(path: str, fixed, moving, warped, jacobian) -> None:
    """PNG: rows = central axial / coronal / sagittal slices; columns = fixed, moving,
    warped, Jacobian determinant (diverging colours around 1; <= 0 is folding)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    columns = (("fixed", fixed, "gray", 0.0, 1.0), ("moving", moving, "gray", 0.0, 1.0),
               ("warped", warped, "gray", 0.0, 1.0),
               ("Jacobian det.", jacobian, "RdBu_r", 0.0, 2.0))
    figure, axes = pyplot.subplots(3, 4, figsize=(10, 7.5))
    centre = [n // 2 for n in fixed.shape]
    for column, (title, volume, cmap, low, high) in enumerate(columns):
        slices = (volume[:, :, centre[2]], volume[:, centre[1], :], volume[centre[0]])
        for row, picture in enumerate(slices):
            shown = axes[row, column].imshow(np.rot90(picture), cmap=cmap, vmin=low,
                                             vmax=high)
            axes[row, column].set_axis_off()
            if row == 0:
                axes[row, column].set_title(title)
        if column == 3:
            figure.colorbar(shown, ax=axes[:, column].tolist(), shrink=0.6)
    folding = 100.0 * float(np.mean(jacobian <= 0))
    figure.suptitle(f"folding voxels (det <= 0): {folding:.3f}%")
    figure.savefig(path, dpi=80)
    pyplot.close(figure)


def check_output_dir(out_dir: str, overwrite: bool = False) -> None:
    """:class:`RegisterError` unless ``out_dir`` can be (re)placed by a new result."""
    parent = os.path.dirname(os.path.abspath(out_dir))
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise RegisterError(f"{out_dir}: output folder exists and is not empty; pass "
                            "--overwrite to replace it (its files are removed)")
    try:
        make_writable_folder(parent)
        if os.path.exists(out_dir) and not os.path.isdir(out_dir):
            raise NotADirectoryError(20, "exists and is not a directory")
    except OSError as error:
        raise RegisterError(f"{out_dir}: output directory not writable "
                            f"({error.strerror or error})") from None


def _publish(staging: str, out_dir: str) -> None:
    """Put the finished ``staging`` folder in place of ``out_dir`` (directory renames;
    a previous result is moved aside first and removed after, so none of its files stay)."""
    if not os.path.exists(out_dir) or not os.listdir(out_dir):
        os.replace(staging, out_dir)
        return
    parent = os.path.dirname(os.path.abspath(out_dir))
    previous = tempfile.mkdtemp(prefix=".old-register-", dir=parent)
    os.rmdir(previous)
    os.rename(out_dir, previous)
    os.rename(staging, out_dir)
    shutil.rmtree(previous, ignore_errors=True)


# ----------------------------------------------------------------------------- pipeline
@dataclass
class Registration:
    """One registered pair, in memory: images on the fixed grid, model-grid arrays."""

    warped: object                       # nibabel image, the moving intensities
    flow: object                         # nibabel [X, Y, Z, 1, 3] mm, in flow_space
    jacobian: object                     # nibabel, det of d(p + u)/dp
    warped_seg: object | None            # nibabel labels, or None
    field_ras: np.ndarray                # [X, Y, Z, 3] mm, RAS
    model_arrays: dict                   # fixed, moving, warped, jacobian on the model grid
    stats: dict


class Registrar:
    """An exported model loaded once, with the preprocessing its training data had.

    ``overrides``: flag name -> value (``modality``, ``crop``, ``margin``, ``window``,
    ``percentiles``, ``threshold``; None = the model's). Use :meth:`register` for images
    in memory (nibabel images or paths) and :func:`write_registration` to save a result.
    """

    def __init__(self, model: str, overrides: dict | None = None,
                 with_masks: bool = False, refine: int = 0,
                 refine_learning_rate: float = DEFAULT_LEARNING_RATE):
        try:
            check_refine_arguments(refine, refine_learning_rate)
        except ValueError as error:
            raise RegisterError(str(error)) from None
        self.loaded, self.size = load_serving_model(model)
        self.model_path = latest_version(model)
        self.info = read_export_info(self.model_path)
        overrides = dict(overrides or {})
        self.settings, self.notes = resolve_preprocessing(self.info, self.size, overrides,
                                                          with_masks)
        self.crop_given = overrides.get("crop") is not None
        self.with_masks = with_masks
        self.crop = scan_crop(self.settings, self.crop_given, with_masks)
        self.settings = replace(self.settings, crop=self.crop, used_masks=with_masks)
        self.refine, self.refine_learning_rate = refine, refine_learning_rate

    def prepare(self, image, mask=None, what: str = "image"):
        """``(nibabel image, PreprocessedScan)`` of one scan, prepared as the model's."""
        image = preprocess.load_image(image, what)
        if (mask is not None) != self.with_masks:
            raise RegisterError("--fixed-mask and --moving-mask go together (both or "
                                "neither)")
        scan = preprocess.preprocess_scan(image, mask=mask, **self.settings.scan_arguments())
        check_prepared(scan, self.settings, preprocess._name(image))
        return image, scan

    def register(self, fixed, moving, fixed_mask=None, moving_mask=None,
                 moving_seg=None, flow_space: str = "ras") -> Registration:
        """Register ``moving`` to ``fixed`` (nibabel images or NIfTI paths), in memory."""
        import tensorflow as tf

        from aldk_tf import spatial

        if (fixed_mask is None) != (moving_mask is None):
            raise RegisterError("--fixed-mask and --moving-mask go together (both or "
                                "neither)")
        fixed_image, fixed_scan = self.prepare(fixed, fixed_mask, "fixed image")
        moving_image, moving_scan = self.prepare(moving, moving_mask, "moving image")
        checks.check_distinct_pair(preprocess._name(fixed), preprocess._name(moving),
                                   fixed_scan.volume, moving_scan.volume,
                                   same=checks.same_file(fixed, moving))
        segmentation = None
        if moving_seg is not None:
            label_image = preprocess.load_image(moving_seg, "moving segmentation")
            if label_image.shape != moving_image.shape or not np.allclose(
                    label_image.affine, moving_image.affine, atol=1e-3):
                raise DataError(f"{preprocess._name(moving_seg)}: segmentation grid "
                                f"(shape {label_image.shape}) differs from the moving "
                                f"image's (shape {moving_image.shape})")
            segmentation = warp.label_array(label_image.dataobj,
                                            preprocess._name(moving_seg))
        fixed_input = fixed_scan.volume.astype(np.float32)[None, ..., None] / 255.0
        moving_input = moving_scan.volume.astype(np.float32)[None, ..., None] / 255.0
        start = time.perf_counter()
        outputs = self.loaded.signatures[SERVING_SIGNATURE](
            fixed=tf.constant(fixed_input), moving=tf.constant(moving_input))
        seconds = time.perf_counter() - start
        flow = outputs["flow"].numpy()                            # [1, D, H, W, 3]
        warped_model = outputs["warped"].numpy()[0, ..., 0]
        refine_seconds = 0.0
        if self.refine:
            from aldk_tf.training.refine import refine_flow
            start = time.perf_counter()
            flow, _ = refine_flow(fixed_input, moving_input, flow, self.refine,
                                  learning_rate=self.refine_learning_rate)
            flow = flow.numpy()
            refine_seconds = time.perf_counter() - start
            warped_model = spatial.warp(moving_input, flow).numpy()[0, ..., 0]
        model_jacobian = spatial.jacobian_determinant(flow).numpy()[0]

        # Fixed source voxel -> model voxel v -> moving model voxel v + flow(v) -> world.
        source_to_model = np.linalg.inv(fixed_scan.affine) @ fixed_image.affine
        model_points = warp.grid_to(source_to_model, fixed_image.shape)  # [X, Y, Z, 3]
        displacement = warp.sample_linear(flow[0], model_points)
        moving_world = warp.apply_affine(moving_scan.affine, model_points + displacement)
        field = moving_world - warp.grid_to(fixed_image.affine, fixed_image.shape)
        moving_points = warp.moving_voxels(field, fixed_image.affine, moving_image.affine)
        warped = warp.sample_linear(np.asarray(moving_image.dataobj, np.float32),
                                    moving_points)
        jacobian = warp.jacobian_of_field(field, fixed_image.affine)
        warped_seg = None
        if segmentation is not None:
            warped_seg = warp.nifti_like(fixed_image,
                                         warp.sample_labels(segmentation, moving_points))
        stats = {"image_size": list(self.size), "seconds": seconds,
                 "refine_steps": self.refine, "refine_seconds": refine_seconds,
                 "folding_percent": 100.0 * float(np.mean(model_jacobian <= 0)),
                 "jacobian_det_std": float(model_jacobian.std()),
                 "folding_percent_fixed_grid": 100.0 * float(np.mean(jacobian <= 0)),
                 "preprocessing": self.settings.to_dict(), "flow_space": flow_space}
        return Registration(
            warped=warp.nifti_like(fixed_image, warped.astype(np.float32)),
            flow=warp.flow_image(fixed_image, field, flow_space),
            jacobian=warp.nifti_like(fixed_image, jacobian.astype(np.float32)),
            warped_seg=warped_seg, field_ras=field,
            model_arrays={"fixed": fixed_input[0, ..., 0], "moving": moving_input[0, ..., 0],
                          "warped": warped_model, "jacobian": model_jacobian},
            stats=stats)


def read_export_info(version_dir: str) -> dict:
    """The version directory's ``export_info.json`` ({} when absent)."""
    path = os.path.join(version_dir, INFO_NAME)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as handle:
            info = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise RegisterError(f"{path}: not readable JSON ({error})") from None
    if not isinstance(info, dict):
        raise RegisterError(f"{path}: expected a JSON object")
    return info


def write_registration(result: Registration, out_dir: str, overwrite: bool = False,
                       extra: dict | None = None) -> list[str]:
    """Write a :class:`Registration` into ``out_dir`` (a new folder, renamed into place);
    returns the written paths."""
    check_output_dir(out_dir, overwrite)
    parent = os.path.dirname(os.path.abspath(out_dir))
    staging = tempfile.mkdtemp(prefix=".tmp-register-", dir=parent)
    try:
        names = {"warped.nii.gz": result.warped, "flow.nii.gz": result.flow,
                 "jacobian.nii.gz": result.jacobian}
        if result.warped_seg is not None:
            names["warped_seg.nii.gz"] = result.warped_seg
        for name, image in names.items():
            image.to_filename(os.path.join(staging, name))
        arrays = result.model_arrays
        write_preview(os.path.join(staging, "preview.png"), arrays["fixed"],
                      arrays["moving"], arrays["warped"], arrays["jacobian"])
        with open(os.path.join(staging, SUMMARY_NAME), "w") as handle:
            json.dump({**(extra or {}), **result.stats}, handle, indent=2)
            handle.write("\n")
        make_readable(staging)
        _publish(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return [os.path.join(out_dir, name) for name in
            [*names, "preview.png", SUMMARY_NAME]]


def register_pair(model: str, fixed: str, moving: str, out_dir: str,
                  moving_seg: str | None = None, fixed_mask: str | None = None,
                  moving_mask: str | None = None, overrides: dict | None = None,
                  refine: int = 0, refine_learning_rate: float = DEFAULT_LEARNING_RATE,
                  flow_space: str = "ras", overwrite: bool = False) -> dict:
    """Register ``moving`` to ``fixed`` (NIfTI paths) and write the outputs to ``out_dir``.

    Returns the result's statistics plus ``outputs`` (paths) and ``notes`` (how the
    preprocessing was chosen). Raises :class:`RegisterError` / :class:`DataError`.
    """
    if flow_space not in warp.FLOW_SPACES:
        raise RegisterError(f"--flow-space: expected one of {warp.FLOW_SPACES}, "
                            f"got '{flow_space}'")
    check_output_dir(out_dir, overwrite)
    for path, what in ((fixed, "fixed image"), (moving, "moving image"),
                       (moving_seg, "moving segmentation"), (fixed_mask, "fixed mask"),
                       (moving_mask, "moving mask")):
        if path is not None:
            preprocess.load_image(path, what)          # fail before loading the model
    registrar = Registrar(model, overrides, with_masks=fixed_mask is not None
                          or moving_mask is not None, refine=refine,
                          refine_learning_rate=refine_learning_rate)
    result = registrar.register(fixed, moving, fixed_mask, moving_mask, moving_seg,
                                flow_space)
    outputs = write_registration(result, out_dir, overwrite, extra={
        "model": os.path.abspath(registrar.model_path), "fixed": os.path.abspath(fixed),
        "moving": os.path.abspath(moving)})
    return {**result.stats, "outputs": outputs, "notes": registrar.notes}


