"""Register a new NIfTI pair with an exported model: ``python -m aldk_tf.register``.

    python -m aldk_tf.register --model export/<name>[/<N>] --fixed F.nii.gz \\
        --moving M.nii.gz --out-dir DIR [--moving-seg S.nii.gz] [--modality mr|ct]
        [--crop auto|mask|nonzero|threshold|none] [--refine N [--refine-lr VOXELS]]

Both scans go through the data preparation's preprocessing
(:func:`aldk_tf.data.preprocess.preprocess_scan`: RAS reorientation, crop box, intensities
to 0..255, resampling to the model's size); the SavedModel's ``serving_default``
signature registers them. Written to ``DIR``, on the fixed image's voxel grid with its
affine (header copied from the fixed file):

- ``warped.nii.gz``        the original moving image (its own intensities) resampled at
                           the corresponding points;
- ``flow.nii.gz``          the displacement ``u`` in millimetres, world (RAS) axes,
                           ``[X, Y, Z, 1, 3]``, intent "vector": the fixed voxel at world
                           position ``p`` corresponds to the moving image's ``p + u(p)``;
- ``warped_seg.nii.gz``    with ``--moving-seg``: labels warped one mask at a time
                           (trilinear, threshold 128 of 255, as the evaluation does);
- ``preview.png``          orthogonal slices of fixed / moving / warped / Jacobian
                           determinant, on the model's grid.

With ``--refine N`` the SavedModel's flow is refined on the model's grid by N steps of
instance optimisation (:mod:`aldk_tf.refine`) before anything is written; the time it
took is printed (the first call includes tracing the refinement, about a second).

Correspondence: the network maps preprocessed fixed voxel ``v`` to preprocessed moving
voxel ``v + flow(v)``; each grid's affine (kept by the preprocessing) takes these to world
coordinates. Sampling uses :func:`aldk_tf.spatial.resample` (trilinear, edge-clamped).
All files are computed first and appear together (directory or file renames).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

from aldk_tf.data import DataError  # noqa: E402
from aldk_tf.data import preprocess  # noqa: E402
from aldk_tf.refine import DEFAULT_LEARNING_RATE  # noqa: E402
from aldk_tf.refine import add_arguments as add_refine_arguments  # noqa: E402
from aldk_tf.serving import SERVING_SIGNATURE, make_readable  # noqa: E402

OUTPUT_NAMES = ("warped.nii.gz", "flow.nii.gz", "warped_seg.nii.gz", "preview.png")


class RegisterError(ValueError):
    """A registration request that cannot be carried out (one-line message)."""


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


# ----------------------------------------------------------------------------- geometry
def _grid_to(transform: np.ndarray, shape) -> np.ndarray:
    """Voxel indices of a grid of ``shape`` mapped by a 4x4 ``transform``, ``[X,Y,Z,3]``."""
    indices = np.indices(shape, dtype=np.float32)                # [3, X, Y, Z]
    matrix = transform[:3, :3].astype(np.float32)
    mapped = np.einsum("ij,jxyz->xyzi", matrix, indices)
    return mapped + transform[:3, 3].astype(np.float32)


def _apply(transform: np.ndarray, points: np.ndarray) -> np.ndarray:
    """A 4x4 affine applied to points ``[..., 3]`` (float32)."""
    matrix = transform[:3, :3].astype(np.float32)
    return points @ matrix.T + transform[:3, 3].astype(np.float32)


def _sample(volume: np.ndarray, coordinate: np.ndarray) -> np.ndarray:
    """Trilinear sample of a 3-D array at voxel ``coordinate`` ``[X, Y, Z, 3]``."""
    import tensorflow as tf

    from aldk_tf import spatial

    image = tf.constant(np.asarray(volume, np.float32)[None, ..., None])
    values = spatial.resample(image, tf.constant(coordinate, tf.float32), 1)
    return values.numpy()[0, ..., 0]


def _sample_labels(labels: np.ndarray, coordinate: np.ndarray) -> np.ndarray:
    """Labels sampled one mask (x 255) at a time, kept where above the evaluation's
    threshold; 0 elsewhere (see :func:`aldk_tf.serving.warp_label_map`)."""
    from aldk_tf.metrics import MASK_THRESHOLD

    result = np.zeros(coordinate.shape[:3], labels.dtype)
    for value in np.unique(labels):
        if value == 0:
            continue
        mask = _sample((labels == value).astype(np.float32) * 255.0, coordinate)
        result[mask > MASK_THRESHOLD] = value
    return result


# ----------------------------------------------------------------------------- outputs
def _nifti_like(reference, data: np.ndarray, intent: str | None = None):
    header = reference.header.copy()
    image = nib.Nifti1Image(data, reference.affine, header=header)
    image.set_data_dtype(data.dtype)
    if intent is not None:
        image.header.set_intent(intent, (), name="displacement mm RAS")
    else:
        image.header.set_intent("none")
    image.set_sform(reference.affine, code=int(reference.header["sform_code"]) or 1)
    image.set_qform(reference.affine, code=int(reference.header["qform_code"]) or 1)
    return image


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


def _check_output_dir(out_dir: str) -> None:
    parent = os.path.dirname(os.path.abspath(out_dir))
    try:
        os.makedirs(parent, exist_ok=True)
        if os.path.exists(out_dir) and not os.path.isdir(out_dir):
            raise NotADirectoryError(20, "exists and is not a directory")
        with tempfile.TemporaryFile(dir=out_dir if os.path.isdir(out_dir) else parent):
            pass
    except OSError as error:
        raise RegisterError(f"{out_dir}: output directory not writable "
                            f"({error.strerror or error})") from None


def _publish(staging: str, out_dir: str) -> None:
    """Move the finished files into ``out_dir`` (a directory rename when it is new)."""
    if not os.path.exists(out_dir):
        os.rename(staging, out_dir)
        return
    for name in os.listdir(staging):
        os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
    os.rmdir(staging)


# ----------------------------------------------------------------------------- pipeline
def register_pair(model: str, fixed: str, moving: str, out_dir: str,
                  moving_seg: str | None = None, modality: str = "mr",
                  crop: str = "auto", refine: int = 0,
                  refine_learning_rate: float = DEFAULT_LEARNING_RATE) -> dict:
    """Register ``moving`` to ``fixed`` (NIfTI paths) and write the outputs to ``out_dir``.

    ``refine > 0`` refines the model's flow by that many instance-optimisation steps.
    Returns ``{"outputs": [paths], "folding_percent", "jacobian_det_std", "seconds",
    "refine_seconds", "image_size"}``. Raises :class:`RegisterError` /
    :class:`aldk_tf.data.DataError`.
    """
    if refine < 0:
        raise RegisterError(f"--refine must be >= 0, got {refine}")
    if refine and not refine_learning_rate > 0:
        raise RegisterError(f"--refine-lr must be > 0, got {refine_learning_rate}")
    _check_output_dir(out_dir)
    fixed_image = preprocess.load_image(fixed, "fixed image")
    moving_image = preprocess.load_image(moving, "moving image")
    segmentation = None
    if moving_seg is not None:
        label_image = preprocess.load_image(moving_seg, "moving segmentation")
        if label_image.shape != moving_image.shape or not np.allclose(
                label_image.affine, moving_image.affine, atol=1e-3):
            raise DataError(f"{moving_seg}: segmentation grid (shape {label_image.shape}) "
                            f"differs from the moving image's (shape {moving_image.shape})")
        segmentation = np.rint(np.asarray(label_image.dataobj, np.float32))
    loaded, size = load_serving_model(model)

    fixed_scan = preprocess.preprocess_scan(fixed_image, size=size, modality=modality,
                                            crop=crop)
    moving_scan = preprocess.preprocess_scan(moving_image, size=size, modality=modality,
                                             crop=crop)
    import tensorflow as tf

    from aldk_tf import spatial
    fixed_input = fixed_scan.volume.astype(np.float32)[None, ..., None] / 255.0
    moving_input = moving_scan.volume.astype(np.float32)[None, ..., None] / 255.0
    start = time.perf_counter()
    outputs = loaded.signatures[SERVING_SIGNATURE](fixed=tf.constant(fixed_input),
                                                   moving=tf.constant(moving_input))
    seconds = time.perf_counter() - start
    flow = outputs["flow"].numpy()                                # [1, D, H, W, 3]
    warped_model = outputs["warped"].numpy()[0, ..., 0]
    refine_seconds = 0.0
    if refine:
        from aldk_tf.refine import refine_flow
        start = time.perf_counter()
        flow, _ = refine_flow(fixed_input, moving_input, flow, refine,
                              learning_rate=refine_learning_rate)
        flow = flow.numpy()
        refine_seconds = time.perf_counter() - start
        warped_model = spatial.warp(moving_input, flow).numpy()[0, ..., 0]
    jacobian = spatial.jacobian_determinant(flow).numpy()[0]

    # Fixed source voxel -> model voxel v -> moving model voxel v + flow(v) -> world.
    source_to_model = np.linalg.inv(fixed_scan.affine) @ fixed_image.affine
    model_points = _grid_to(source_to_model, fixed_image.shape)   # [X, Y, Z, 3]
    displacement = np.stack([_sample(flow[0, ..., axis], model_points)
                             for axis in range(3)], axis=-1)
    moving_world = _apply(moving_scan.affine, model_points + displacement)
    fixed_world = _grid_to(fixed_image.affine, fixed_image.shape)
    moving_points = _apply(np.linalg.inv(moving_image.affine), moving_world)
    warped = _sample(np.asarray(moving_image.dataobj, np.float32), moving_points)

    parent = os.path.dirname(os.path.abspath(out_dir))
    staging = tempfile.mkdtemp(prefix=".tmp-register-", dir=parent)
    try:
        written = []

        def save(name, image):
            image.to_filename(os.path.join(staging, name))
            written.append(os.path.join(out_dir, name))

        save("warped.nii.gz", _nifti_like(fixed_image, warped.astype(np.float32)))
        field = (moving_world - fixed_world).astype(np.float32)[:, :, :, None, :]
        save("flow.nii.gz", _nifti_like(fixed_image, field, intent="vector"))
        if segmentation is not None:
            labels = _sample_labels(segmentation.astype(np.int32), moving_points)
            save("warped_seg.nii.gz", _nifti_like(fixed_image, labels.astype(np.int16)))
        write_preview(os.path.join(staging, "preview.png"), fixed_input[0, ..., 0],
                      moving_input[0, ..., 0], warped_model, jacobian)
        written.append(os.path.join(out_dir, "preview.png"))
        make_readable(staging)
        _publish(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {"outputs": written, "image_size": list(size), "seconds": seconds,
            "refine_steps": refine, "refine_seconds": refine_seconds,
            "folding_percent": 100.0 * float(np.mean(jacobian <= 0)),
            "jacobian_det_std": float(jacobian.std())}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
                                     description="Register a NIfTI pair with an exported "
                                     "model (export.py).")
    parser.add_argument("--model", required=True, help="SavedModel version directory "
                        "export/<name>/<N> (or export/<name>: its latest version)")
    parser.add_argument("--fixed", required=True, help="fixed image (NIfTI)")
    parser.add_argument("--moving", required=True, help="moving image (NIfTI)")
    parser.add_argument("--out-dir", required=True, help="output folder")
    parser.add_argument("--moving-seg", help="moving segmentation (NIfTI labels) to warp")
    parser.add_argument("--modality", choices=preprocess.MODALITIES, default="mr",
                        help="intensity normalisation, as for the training data "
                        "(default mr)")
    parser.add_argument("--crop", choices=preprocess.CROPS, default="auto",
                        help="crop box, as for the training data (default auto)")
    add_refine_arguments(parser, "refine the model's flow by")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        result = register_pair(args.model, args.fixed, args.moving, args.out_dir,
                               moving_seg=args.moving_seg, modality=args.modality,
                               crop=args.crop, refine=args.refine,
                               refine_learning_rate=args.refine_lr)
    except (RegisterError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path in result["outputs"]:
        print(path)
    print(f"model grid {tuple(result['image_size'])}, {result['seconds']:.2f} s, "
          f"folding {result['folding_percent']:.3f}%, "
          f"std det(J) {result['jacobian_det_std']:.3f}")
    if result["refine_steps"]:
        print(f"refined by {result['refine_steps']} steps in "
              f"{result['refine_seconds']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
