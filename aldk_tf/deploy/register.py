"""Register a new pair of scans with an exported model (the console script
``aldk-register``, :mod:`aldk_tf.cli.register`).

Both scans go through the data preparation's preprocessing
(:func:`aldk_tf.data.preprocess.preprocess_scan`: RAS reorientation, crop box, intensities
to 0..255, resampling to the model's size) **with the settings the model's training data
was prepared with**: ``aldk-prep`` and the demo builder store them in the dataset JSON,
training copies them into the run's ``config.json``, export into ``export_info.json``,
where register reads them. A model that records none is refused unless flags state the
preparation (:mod:`aldk_tf.deploy.preparation`). A flag overrides one setting (printed as
a note); the modality cannot be changed. Then the SavedModel's ``serving_default``
signature registers them, and the result is carried onto the fixed scan's own grid
(:mod:`aldk_tf.deploy.fixed_grid`). Written to ``DIR``, with the fixed image's grid,
affine and header:

- ``warped.nii.gz``        the original moving image (its own intensities) resampled at
                           the corresponding points (float32);
- ``flow.nii.gz``          the displacement ``u`` in millimetres, ``[X, Y, Z, 1, 3]``,
                           intent "vector", units mm; by default in ITK/ANTs LPS axes
                           (``antsApplyTransforms -t flow.nii.gz`` reads it as is),
                           ``--flow-space ras`` for nibabel's RAS axes (see
                           :mod:`aldk_tf.deploy.warp`): the fixed voxel at world position
                           ``p`` corresponds to the moving image's ``p + u(p)``;
                           stored uncompressed inside gzip (level 0: float vectors
                           barely compress, and every reader opens it as is);
- ``warped_seg.nii.gz``    with ``--moving-seg``: labels warped one mask at a time
                           (trilinear, threshold 128 of 255, as the evaluation does), in
                           an integer type wide enough for the values (uint16 for 40000);
- ``registration.json``    the model, the inputs, the preprocessing used, timings, and
                           folding / std det(J) on the model grid and on the fixed grid;
- on request, ``jacobian.nii.gz`` (``--jacobian``: det of the Jacobian of
  ``p -> p + u(p)``, <= 0 is folding) and ``preview.png`` (``--preview``:
  :mod:`aldk_tf.deploy.preview`).

An existing non-empty ``DIR`` is refused unless ``--overwrite``; then it is replaced as
a whole (no file of a previous pair stays). ``aldk-warp`` applies ``flow.nii.gz`` to
other images. ``--pairs`` registers every row of a CSV with the model loaded once
(:mod:`aldk_tf.deploy.register_batch`). :class:`Registrar` is the in-memory interface:
:meth:`Registrar.register` for nibabel images or paths, :meth:`Registrar.register_arrays`
for numpy arrays (voxel flow and warped arrays out).

With ``--refine N`` the SavedModel's flow is refined by N steps of instance optimisation
(:mod:`aldk_tf.training.refine`) before anything is written, on a grid ``--refine-grid``
times finer than the model's (both scans prepared again in the same crop boxes at that
size, the network's flow upsampled as the start, the step size scaled alike), lowered
so that its voxels are not finer than the fixed scan's (:func:`refinement_factor`).
All files are computed first in a temporary folder, which is then renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import nibabel as nib
import numpy as np

from aldk_tf.data import DataError, checks, preprocess
from aldk_tf.deploy import fixed_grid, warp
from aldk_tf.deploy.export_layout import (INFO_NAME, SERVING_SIGNATURE, make_readable,
                                          make_writable_folder)
from aldk_tf.deploy.fixed_grid import FixedGrid
from aldk_tf.deploy.preparation import (RegisterError, check_prepared, check_stated,
                                        resolve_preprocessing, scan_crop)
from aldk_tf.deploy.preview import write_preview
from aldk_tf.refine_options import (DEFAULT_LEARNING_RATE, DEFAULT_REFINE_GRID,
                                    MAX_REFINE_GRID)
from aldk_tf.refine_options import check_arguments as check_refine_arguments

SUMMARY_NAME = "registration.json"
#: Written by every registration (warped_seg.nii.gz only with a moving segmentation).
OUTPUT_NAMES = ("warped.nii.gz", "flow.nii.gz", "warped_seg.nii.gz", SUMMARY_NAME)
#: Written on request (``--jacobian``, ``--preview``).
OPTIONAL_NAMES = ("jacobian.nii.gz", "preview.png")
#: Default axes of flow.nii.gz's vectors: what ITK and ANTs read correctly.
DEFAULT_FLOW_SPACE = "lps"
#: zlib's gzip level of each written NIfTI file where ISA-L is missing (with it, every file
#: at ISA-L's level 1, :func:`aldk_tf.deploy.warp.gzip_writer`): the flow's float vectors
#: barely compress, so flow.nii.gz is stored (level 0, a .nii.gz any reader opens).
COMPRESS_LEVELS = {"flow.nii.gz": 0}
DEFAULT_COMPRESS_LEVEL = 1


# ----------------------------------------------------------------------------- model
def load_serving_model(path: str):
    """``(loaded SavedModel, (D, H, W))`` of an exported SavedModel version directory.

    Keep the loaded object while calling ``loaded.signatures[...]``: the signatures only
    hold weak references to its variables.
    """
    import tensorflow as tf

    path = check_model_dir(path)
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


def check_model_dir(path: str) -> str:
    """The SavedModel version directory of ``path`` (:func:`latest_version`), or a
    :class:`RegisterError` when it holds no ``saved_model.pb``."""
    path = latest_version(path)
    if not os.path.isfile(os.path.join(path, "saved_model.pb")):
        raise RegisterError(f"{path}: not a SavedModel version directory (no "
                            "saved_model.pb); expected export/<name>/<N> from export.py")
    return path


def latest_version(path: str) -> str:
    """``path`` itself, or its highest numeric version subdirectory when ``path`` is a
    model base directory (``export/<name>``), as TF Serving would pick."""
    if os.path.isfile(os.path.join(path, "saved_model.pb")) or not os.path.isdir(path):
        return path
    versions = [int(name) for name in os.listdir(path) if name.isdigit() and
                os.path.isfile(os.path.join(path, name, "saved_model.pb"))]
    return os.path.join(path, str(max(versions))) if versions else path


# ----------------------------------------------------------------------------- outputs
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
    """One registered pair, in memory: nibabel images on the fixed grid, model arrays."""

    warped: object                       # nibabel image, the moving intensities (float32)
    flow: object                         # nibabel [X, Y, Z, 1, 3] mm, in stats["flow_space"]
    jacobian: object                     # nibabel, det of d(p + u)/dp on the fixed grid
    warped_seg: object | None            # nibabel labels, or None
    model_arrays: dict                   # fixed, moving, warped, jacobian on the model grid
    stats: dict
    fixed_image: object = None           # the inputs as read (nibabel)
    moving_image: object = None

    @property
    def field_ras(self) -> np.ndarray:
        """The displacement ``[X, Y, Z, 3]`` mm in RAS axes (the flow's data for a RAS
        flow, a flipped copy for LPS)."""
        field = np.asarray(self.flow.dataobj)[:, :, :, 0, :]
        return warp.from_flow_space(field, self.stats["flow_space"])


@dataclass
class ArrayRegistration:
    """One registered pair of numpy arrays (:meth:`Registrar.register_arrays`).

    ``flow[x]`` (voxels, ``[X, Y, Z, 3]`` on the fixed array's grid, channel i along array
    axis i) takes fixed voxel ``x`` to the moving array's voxel ``x + flow[x]`` (the
    library's warp convention; with grids of different spacing or position the flow holds
    that difference too). ``warped`` is the moving array sampled there (float32),
    ``warped_seg`` the moving labels (or None), ``jacobian`` det of the Jacobian in world
    units, ``stats`` as in ``registration.json``.
    """

    flow: np.ndarray
    warped: np.ndarray
    warped_seg: np.ndarray | None
    jacobian: np.ndarray
    stats: dict


def as_image(data, spacing=None, affine=None, what: str = "image"):
    """A nibabel image of a 3-D numpy array: ``affine`` (4x4, voxel -> world mm, RAS), else
    ``diag(spacing)`` (mm, default 1), array axes along x, y, z."""
    data = np.asarray(data)
    if data.ndim != 3:
        raise DataError(f"{what}: array of shape {data.shape}, expected 3-D")
    if affine is not None and spacing is not None:
        raise DataError(f"{what}: give a spacing or an affine, not both")
    if affine is None:
        spacing = np.broadcast_to(np.asarray(1.0 if spacing is None else spacing,
                                             np.float64), (3,))
        if not (np.isfinite(spacing).all() and (spacing > 0).all()):
            raise DataError(f"{what}: spacing {spacing.tolist()}: expected three sizes > 0")
        affine = np.diag([*spacing, 1.0])
    affine = np.asarray(affine, np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all() or \
            abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DataError(f"{what}: affine must be an invertible 4x4 matrix")
    return nib.Nifti1Image(data, affine)


def _image(value, what: str):
    """Paths and DICOM folders are read; numpy arrays become 1 mm RAS images."""
    if isinstance(value, np.ndarray):
        return as_image(value, what=what)
    return preprocess.load_image(value, what)


class Registrar:
    """An exported model loaded once, with the preprocessing its training data had.

    ``overrides``: flag name -> value (``modality``, ``crop``, ``margin``, ``intensity``,
    ``window``, ``percentiles``, ``threshold``; None = the model's). Use :meth:`register`
    for images (nibabel images, NIfTI paths, DICOM folders, or numpy arrays taken as 1 mm
    RAS grids), :meth:`register_arrays` for numpy arrays with their spacing or affine, and
    :func:`write_registration` to save a result.
    """

    def __init__(self, model: str, overrides: dict | None = None,
                 with_masks: bool = False, refine: int = 0,
                 refine_learning_rate: float = DEFAULT_LEARNING_RATE,
                 refine_grid: int = DEFAULT_REFINE_GRID):
        try:
            check_refine_arguments(refine, refine_learning_rate)
        except ValueError as error:
            raise RegisterError(str(error)) from None
        if isinstance(refine_grid, bool) or not isinstance(refine_grid, int) \
                or not 1 <= refine_grid <= MAX_REFINE_GRID:
            raise RegisterError(f"--refine-grid: expected an integer from 1 to "
                                f"{MAX_REFINE_GRID}, got {refine_grid!r}")
        self.refine_grid = refine_grid
        self.model_path = check_model_dir(model)
        self.info = read_export_info(self.model_path)
        overrides = dict(overrides or {})
        check_stated(self.info, overrides)              # before the slow model load
        self.loaded, self.size = load_serving_model(model)
        self.settings, self.notes = resolve_preprocessing(self.info, self.size, overrides,
                                                          with_masks)
        self.crop_given = overrides.get("crop") is not None
        self.with_masks = with_masks
        self.crop = scan_crop(self.settings, self.crop_given, with_masks)
        self.settings = replace(self.settings, crop=self.crop, used_masks=with_masks)
        self.refine, self.refine_learning_rate = refine, refine_learning_rate

    def prepare(self, image, mask=None, what: str = "image"):
        """``(nibabel image, PreprocessedScan)`` of one scan, prepared as the model's."""
        image = _image(image, what)
        if (mask is not None) != self.with_masks:
            raise RegisterError("--fixed-mask and --moving-mask go together (both or "
                                "neither)")
        scan = preprocess.preprocess_scan(image, mask=mask, **self.settings.scan_arguments())
        check_prepared(scan, self.settings, preprocess._name(image))
        return image, scan

    def register(self, fixed, moving, fixed_mask=None, moving_mask=None,
                 moving_seg=None, flow_space: str = DEFAULT_FLOW_SPACE) -> Registration:
        """Register ``moving`` to ``fixed`` in memory (nibabel images, NIfTI paths, DICOM
        folders, or 3-D numpy arrays taken as 1 mm grids along RAS)."""
        import tensorflow as tf

        from aldk_tf import spatial

        started = time.perf_counter()
        if flow_space not in warp.FLOW_SPACES:
            raise RegisterError(f"--flow-space: expected one of {warp.FLOW_SPACES}, "
                                f"got '{flow_space}'")
        if (fixed_mask is None) != (moving_mask is None):
            raise RegisterError("--fixed-mask and --moving-mask go together (both or "
                                "neither)")
        fixed_image, fixed_scan = self.prepare(fixed, fixed_mask, "fixed image")
        moving_image, moving_scan = self.prepare(moving, moving_mask, "moving image")
        checks.check_distinct_pair(preprocess._name(fixed_image),
                                   preprocess._name(moving_image),
                                   fixed_scan.volume, moving_scan.volume,
                                   same=checks.same_file(fixed, moving))
        segmentation = None
        if moving_seg is not None:
            label_image = _image(moving_seg, "moving segmentation")
            if label_image.shape != moving_image.shape or not np.allclose(
                    label_image.affine, moving_image.affine, atol=1e-3):
                raise DataError(f"{preprocess._name(label_image)}: segmentation grid "
                                f"(shape {label_image.shape}) differs from the moving "
                                f"image's (shape {moving_image.shape})")
            segmentation = warp.label_array(label_image.dataobj,
                                            preprocess._name(label_image))
        fixed_input = fixed_scan.volume.astype(np.float32)[None, ..., None] / 255.0
        moving_input = moving_scan.volume.astype(np.float32)[None, ..., None] / 255.0
        start = time.perf_counter()
        outputs = self.loaded.signatures[SERVING_SIGNATURE](
            fixed=tf.constant(fixed_input), moving=tf.constant(moving_input))
        seconds = time.perf_counter() - start
        flow = outputs["flow"].numpy()                            # [1, D, H, W, 3]
        warped_model = outputs["warped"].numpy()[0, ..., 0]
        model_jacobian = fixed_grid.jacobian_determinant(flow[0])
        refine_seconds, factor = 0.0, 1
        if self.refine:
            from aldk_tf.training.refine import refine_flow
            start = time.perf_counter()
            factor = refinement_factor(self.refine_grid, fixed_scan.affine,
                                       fixed_image.affine)
            refine_fixed, refine_moving = fixed_input, moving_input
            if factor > 1:       # the same boxes on a finer grid, the flow upsampled
                fine = replace(self.settings, size=tuple(n * factor for n in self.size))
                fixed_scan, moving_scan = (
                    preprocess.preprocess_scan(image, mask=mask, **fine.scan_arguments())
                    for image, mask in ((fixed_image, fixed_mask),
                                        (moving_image, moving_mask)))
                refine_fixed, refine_moving = (
                    scan.volume.astype(np.float32)[None, ..., None] / 255.0
                    for scan in (fixed_scan, moving_scan))
                flow = spatial.upsample_flow(flow, factor)
            flow, _ = refine_flow(refine_fixed, refine_moving, flow, self.refine,
                                  learning_rate=self.refine_learning_rate * factor)
            flow = flow.numpy()
            refine_seconds = time.perf_counter() - start
            warped_model = spatial.warp(moving_input, spatial.downsample_flow(
                flow, factor) if factor > 1 else flow).numpy()[0, ..., 0]
            model_jacobian = fixed_grid.jacobian_determinant(flow[0])

        # Fixed source voxel -> model voxel v -> moving model voxel v + flow(v) -> world.
        grid = FixedGrid(flow[0], np.linalg.inv(fixed_scan.affine) @ fixed_image.affine,
                         moving_scan.affine, fixed_image.affine, fixed_image.shape)
        field, jacobian = grid.carry()
        warped = warp.warp_volume(np.asarray(moving_image.dataobj, np.float32), field,
                                  fixed_image.affine, moving_image.affine)
        warped_seg = None
        if segmentation is not None:
            warped_seg = warp.nifti_like(fixed_image, warp.warp_volume(
                segmentation, field, fixed_image.affine, moving_image.affine, "labels"))
        stats = {"image_size": list(self.size), "fixed_grid_shape": list(fixed_image.shape),
                 "network_seconds": seconds, "refine_steps": self.refine,
                 "refine_seconds": refine_seconds,
                 "refine_grid": list(fixed_scan.volume.shape),
                 "folding_percent_model_grid": 100.0 * float(np.mean(model_jacobian <= 0)),
                 "jacobian_det_std_model_grid": float(model_jacobian.std()),
                 "folding_percent_fixed_grid": 100.0 * float(np.mean(jacobian <= 0)),
                 "jacobian_det_std_fixed_grid": float(jacobian.std()),
                 "preprocessing": self.settings.to_dict(), "flow_space": flow_space,
                 "register_seconds": time.perf_counter() - started}
        return Registration(
            warped=warp.nifti_like(fixed_image, warped),
            flow=warp.flow_image(fixed_image, field, flow_space, in_place=True),
            jacobian=warp.nifti_like(fixed_image, jacobian),
            warped_seg=warped_seg,
            model_arrays={"fixed": fixed_input[0, ..., 0], "moving": moving_input[0, ..., 0],
                          "warped": warped_model, "jacobian": model_jacobian},
            stats=stats, fixed_image=fixed_image, moving_image=moving_image)

    def register_arrays(self, fixed: np.ndarray, moving: np.ndarray, fixed_spacing=None,
                        moving_spacing=None, fixed_affine=None, moving_affine=None,
                        moving_seg: np.ndarray | None = None,
                        fixed_mask: np.ndarray | None = None,
                        moving_mask: np.ndarray | None = None) -> ArrayRegistration:
        """Register numpy arrays: 3-D ``fixed`` and ``moving`` scans, each with a spacing
        (mm per array axis, default 1) or a 4x4 affine (voxel -> world mm, RAS; default
        ``diag(spacing)``); ``moving_seg`` labels on the moving grid, masks on theirs.
        Returns :class:`ArrayRegistration` (voxel flow, warped arrays, statistics)."""
        fixed_image = as_image(fixed, fixed_spacing, fixed_affine, "fixed")
        moving_image = as_image(moving, moving_spacing, moving_affine, "moving")
        extra = {name: None if value is None else
                 nib.Nifti1Image(np.asarray(value), image.affine)
                 for name, value, image in (("moving_seg", moving_seg, moving_image),
                                            ("fixed_mask", fixed_mask, fixed_image),
                                            ("moving_mask", moving_mask, moving_image))}
        result = self.register(fixed_image, moving_image, extra["fixed_mask"],
                               extra["moving_mask"], extra["moving_seg"], "ras")
        shape = fixed_image.shape
        flow = np.empty((*shape, 3), np.float32)
        for first in range(0, shape[0], warp.SLAB_ROWS):
            last = min(first + warp.SLAB_ROWS, shape[0])
            points = warp.moving_voxels(result.field_ras[first:last], fixed_image.affine,
                                        moving_image.affine, first, shape)
            flow[first:last] = points - np.stack(np.meshgrid(
                np.arange(first, last), np.arange(shape[1]), np.arange(shape[2]),
                indexing="ij"), axis=-1)
        return ArrayRegistration(
            flow=flow, warped=np.asarray(result.warped.dataobj),
            warped_seg=None if result.warped_seg is None else
            np.asarray(result.warped_seg.dataobj),
            jacobian=np.asarray(result.jacobian.dataobj), stats=result.stats)


def refinement_factor(wanted: int, model_affine: np.ndarray,
                      scan_affine: np.ndarray) -> int:
    """The refinement grid's factor: ``wanted``, lowered until the refinement grid's
    voxels are no finer than the fixed scan's along any axis (by 10 %: a 2.1 mm model
    voxel over a 1.0 mm scan still gets factor 2); at least 1."""
    model_voxel = np.linalg.norm(np.asarray(model_affine)[:3, :3], axis=0)
    scan_voxel = np.linalg.norm(np.asarray(scan_affine)[:3, :3], axis=0)
    ratio = float(np.min(model_voxel) / max(float(np.min(scan_voxel)), 1e-9))
    factor = int(wanted)
    while factor > 1 and ratio / factor < 0.9:
        factor -= 1
    return factor


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
                       extra: dict | None = None, jacobian: bool = False,
                       preview: bool = False) -> list[str]:
    """Write a :class:`Registration` into ``out_dir`` (a new folder, renamed into place);
    ``jacobian`` / ``preview``: also ``jacobian.nii.gz`` / ``preview.png``. Returns the
    written paths. The NIfTI files are written in parallel (zlib releases the GIL), each
    at its gzip level (:data:`COMPRESS_LEVELS`)."""
    check_output_dir(out_dir, overwrite)
    parent = os.path.dirname(os.path.abspath(out_dir))
    staging = tempfile.mkdtemp(prefix=".tmp-register-", dir=parent)
    try:
        names = {"warped.nii.gz": result.warped, "flow.nii.gz": result.flow}
        if result.warped_seg is not None:
            names["warped_seg.nii.gz"] = result.warped_seg
        if jacobian:
            names["jacobian.nii.gz"] = result.jacobian
        with ThreadPoolExecutor(max_workers=len(names)) as pool:
            for done in [pool.submit(warp.save_image, image, os.path.join(staging, name),
                                     COMPRESS_LEVELS.get(name, DEFAULT_COMPRESS_LEVEL))
                         for name, image in names.items()]:
                done.result()
        written = list(names)
        if preview:
            write_preview(os.path.join(staging, "preview.png"), result.fixed_image,
                          result.moving_image, result.warped, result.jacobian)
            written.append("preview.png")
        with open(os.path.join(staging, SUMMARY_NAME), "w") as handle:
            json.dump({**(extra or {}), **result.stats}, handle, indent=2)
            handle.write("\n")
        written.append(SUMMARY_NAME)
        make_readable(staging)
        _publish(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return [os.path.join(out_dir, name) for name in written]


def register_pair(model: str, fixed: str, moving: str, out_dir: str,
                  moving_seg: str | None = None, fixed_mask: str | None = None,
                  moving_mask: str | None = None, overrides: dict | None = None,
                  refine: int = 0, refine_learning_rate: float = DEFAULT_LEARNING_RATE,
                  flow_space: str = DEFAULT_FLOW_SPACE, overwrite: bool = False,
                  jacobian: bool = False, preview: bool = False,
                  refine_grid: int = DEFAULT_REFINE_GRID) -> dict:
    """Register ``moving`` to ``fixed`` (NIfTI paths or DICOM folders) and write the
    outputs to ``out_dir``.

    Returns the result's statistics plus ``outputs`` (paths), ``notes`` (how the
    preprocessing was chosen) and ``wall_seconds`` (reading to written, the model's
    loading included). Raises :class:`RegisterError` / :class:`DataError`.
    """
    started = time.perf_counter()
    if flow_space not in warp.FLOW_SPACES:
        raise RegisterError(f"--flow-space: expected one of {warp.FLOW_SPACES}, "
                            f"got '{flow_space}'")
    check_output_dir(out_dir, overwrite)
    images = {}
    for name, path, what in (("fixed", fixed, "fixed image"),
                             ("moving", moving, "moving image"),
                             ("moving_seg", moving_seg, "moving segmentation"),
                             ("fixed_mask", fixed_mask, "fixed mask"),
                             ("moving_mask", moving_mask, "moving mask")):
        # Read once, before loading the model: a bad file fails first.
        images[name] = None if path is None else preprocess.load_image(path, what)
    registrar = Registrar(model, overrides, with_masks=fixed_mask is not None
                          or moving_mask is not None, refine=refine,
                          refine_learning_rate=refine_learning_rate,
                          refine_grid=refine_grid)
    result = registrar.register(images["fixed"], images["moving"], images["fixed_mask"],
                                images["moving_mask"], images["moving_seg"], flow_space)
    outputs = write_registration(result, out_dir, overwrite, extra={
        "model": os.path.abspath(registrar.model_path), "fixed": os.path.abspath(fixed),
        "moving": os.path.abspath(moving)}, jacobian=jacobian, preview=preview)
    return {**result.stats, "outputs": outputs, "notes": registrar.notes,
            "wall_seconds": time.perf_counter() - started}
