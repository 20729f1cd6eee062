"""``preview.png`` of a registration: like with like, on the fixed scan's own grid.

Rows: the central axial, coronal and sagittal slices (RAS-reoriented, voxel sizes kept
as aspect ratios). Columns: the fixed scan; the moving scan *before* registration (sampled
at the same world points, no deformation); the moving scan *after* (``warped.nii.gz``);
the Jacobian determinant of the written flow (diverging colours around 1; <= 0 is
folding). Both moving columns are one trilinear sampling of the moving scan at the fixed
scan's resolution and share one intensity scale, so sharpness and contrast compare.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np

from aldk_tf.deploy import warp


def _canonical(image):
    return nib.as_closest_canonical(image)


def _display_scale(data: np.ndarray) -> float:
    values = data[data > 0]
    high = float(np.percentile(values, 99.5)) if values.size else float(data.max())
    return high if high > 0 else 1.0


def _slices(volume: np.ndarray):
    centre = [n // 2 for n in volume.shape]
    return (volume[:, :, centre[2]], volume[:, centre[1], :], volume[centre[0]])


def _before(moving_image, canonical_fixed) -> list[np.ndarray]:
    """The moving scan sampled at the world points of the fixed scan's central slices."""
    shape = canonical_fixed.shape
    centre = [n // 2 for n in shape]
    to_moving = np.linalg.inv(moving_image.affine) @ canonical_fixed.affine
    data = np.asarray(moving_image.dataobj, np.float32)
    planes = []
    for axis in (2, 1, 0):
        index = np.meshgrid(*[np.arange(n) if a != axis else np.array([centre[a]])
                              for a, n in enumerate(shape)], indexing="ij")
        points = np.stack([i.squeeze(axis) for i in index], axis=-1).astype(np.float64)
        coordinate = points @ to_moving[:3, :3].T + to_moving[:3, 3]
        planes.append(warp.sample_linear(data, coordinate))
    return planes


def write_preview(path: str, fixed_image, moving_image, warped_image,
                  jacobian_image) -> None:
    """Write the PNG (see the module docstring); images are nibabel images."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    fixed = _canonical(fixed_image)
    spacing = np.sqrt((fixed.affine[:3, :3] ** 2).sum(axis=0))
    fixed_data = np.asarray(fixed.dataobj, np.float32)
    warped = np.asarray(_canonical(warped_image).dataobj, np.float32)
    jacobian = np.asarray(_canonical(jacobian_image).dataobj, np.float32)
    moving_scale = _display_scale(np.asarray(moving_image.dataobj, np.float32))
    columns = (("fixed", _slices(fixed_data / _display_scale(fixed_data)), "gray", 0, 1),
               ("moving (before)", [p / moving_scale for p in _before(moving_image, fixed)],
                "gray", 0, 1),
               ("warped (after)", _slices(warped / moving_scale), "gray", 0, 1),
               ("Jacobian det.", _slices(jacobian), "RdBu_r", 0, 2))
    plane_axes = ((0, 1), (0, 2), (1, 2))
    figure, axes = pyplot.subplots(3, 4, figsize=(10, 7.5))
    for column, (title, pictures, cmap, low, high) in enumerate(columns):
        for row, picture in enumerate(pictures):
            across, up = plane_axes[row]
            shown = axes[row, column].imshow(np.rot90(picture), cmap=cmap, vmin=low,
                                             vmax=high, aspect=spacing[up] / spacing[across])
            axes[row, column].set_axis_off()
            if row == 0:
                axes[row, column].set_title(title)
        if column == 3:
            figure.colorbar(shown, ax=axes[:, column].tolist(), shrink=0.6)
    folding = 100.0 * float(np.mean(jacobian <= 0))
    grid = "x".join(map(str, fixed_data.shape))
    figure.suptitle(f"on the fixed scan's grid ({grid}, "
                    f"{'x'.join(f'{s:.2g}' for s in spacing)} mm); folding voxels "
                    f"(det <= 0): {folding:.3f}%")
    figure.savefig(path, dpi=80)
    pyplot.close(figure)
