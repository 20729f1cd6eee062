"""Apply a saved flow to any NIfTI image or label map (:func:`warp_file`; the console
script ``aldk-warp``, :mod:`aldk_tf.cli.warp`).

The flow is a displacement field as ``aldk-register`` writes it: ``[X, Y, Z, 1, 3]`` on
the fixed image's grid (its affine), in millimetres, intent "vector". The fixed voxel at
world position ``p`` corresponds to the moving world position ``p + u(p)``; the image to
warp may be on any grid (its own affine), usually the moving scan's or one on the same
grid (a label map, a dose map, another contrast). The result is on the fixed grid.

Flow spaces (``--flow-space``):

- ``ras``: ``u`` in world RAS axes (x to the Right, y Anterior, z Superior), as NIfTI's
  affines (and nibabel) are;
- ``lps``: ``u`` in LPS axes (x Left, y Posterior, z Superior), the physical space of ITK
  and ANTs: ``u_lps = (-u_x, -u_y, u_z)``. ITK converts a NIfTI affine to LPS when it reads
  the file but leaves the vector values as stored, so a field meant for
  ``antsApplyTransforms -t flow.nii.gz`` must hold LPS vectors;
- ``auto`` (default): the space named in the file's intent name (``displacement RAS``
  or ``displacement LPS``, as register writes it); a file that names neither is refused
  (pass ``--flow-space``: guessing RAS would warp an ITK field the wrong way silently).

Interpolation: ``linear`` (trilinear, edge-clamped: :func:`aldk_tf.spatial.sample`, for
images), ``nearest`` (nearest voxel, for label maps without partial-volume voting) and
``labels`` (each label's mask x 255 warped trilinearly and kept above 128: the rule
``"threshold"`` of :func:`aldk_tf.spatial.sample_labels`, the evaluation's, also used by
``register --moving-seg``; voxels no label reaches are 0).
"""

from __future__ import annotations

import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from aldk_tf.data import checks, preprocess  # noqa: E402

FLOW_SPACES = ("ras", "lps")
INTERPOLATIONS = ("linear", "nearest", "labels")
#: Flips world RAS axes to LPS (and back: it is its own inverse).
RAS_TO_LPS = np.array([-1.0, -1.0, 1.0], np.float32)
FLOW_INTENT = "displacement {space}"           # NIfTI intent names hold 16 bytes


class WarpError(ValueError):
    """A warp request that cannot be carried out (one-line message)."""


# ----------------------------------------------------------------------------- flow files
def to_flow_space(field_ras: np.ndarray, space: str) -> np.ndarray:
    """A RAS displacement field ``[..., 3]`` expressed in ``space`` ("ras" or "lps")."""
    if space not in FLOW_SPACES:
        raise WarpError(f"--flow-space: expected one of {FLOW_SPACES}, got '{space}'")
    return field_ras * RAS_TO_LPS if space == "lps" else field_ras


def from_flow_space(field: np.ndarray, space: str) -> np.ndarray:
    """The RAS displacement field of a field stored in ``space``."""
    return to_flow_space(field, space)                 # the flip is its own inverse


def nifti_like(reference, data: np.ndarray, intent: str | None = None,
               intent_name: str = ""):
    """A NIfTI image of ``data`` on ``reference``'s grid with its header and affine."""
    import nibabel as nib

    image = nib.Nifti1Image(data, reference.affine, header=reference.header.copy())
    image.set_data_dtype(data.dtype)
    if intent is not None:
        image.header.set_intent(intent, (), name=intent_name)
    else:
        image.header.set_intent("none")
    image.set_sform(reference.affine, code=int(reference.header["sform_code"]) or 1)
    image.set_qform(reference.affine, code=int(reference.header["qform_code"]) or 1)
    image.header.set_xyzt_units("mm", "sec")       # affines map voxels to millimetres
    image.header["scl_slope"], image.header["scl_inter"] = np.nan, np.nan
    return image


def flow_image(reference, field_ras: np.ndarray, space: str = "ras",
               in_place: bool = False):
    """The NIfTI of a RAS displacement field ``[X, Y, Z, 3]`` (mm), stored in ``space``;
    its data is ``field_ras`` itself where no conversion is needed. ``in_place``: a
    float32 ``field_ras`` is flipped to LPS in place (no second full-size array; it then
    holds LPS vectors)."""
    field = np.asarray(field_ras, np.float32)
    if in_place and field is field_ras and space == "lps":
        field *= RAS_TO_LPS
    else:
        field = to_flow_space(field, space)               # a new array for LPS
    data = field[:, :, :, None, :]
    return nifti_like(reference, data, intent="vector",
                      intent_name=FLOW_INTENT.format(space=space.upper()))


def save_image(image, path: str, compress_level: int = 1) -> None:
    """Write a NIfTI image to ``path``; a ``.gz`` name is gzip-compressed by
    :func:`gzip_writer` (``compress_level``: zlib's level where ISA-L is missing)."""
    from nibabel.fileholders import FileHolder

    if not path.endswith(".gz"):
        image.to_filename(path)
        return
    with gzip_writer(path, compress_level) as handle:
        holder = FileHolder(fileobj=handle)
        image.to_file_map({"header": holder, "image": holder})


def gzip_writer(path: str, compress_level: int = 1):
    """A binary gzip file open for writing: ISA-L's compressor (package ``isal``) at its
    level 1 where installed, else zlib's at ``compress_level`` (0 = stored without
    compression, still a gzip file every reader opens; 1 = nibabel's default).

    ISA-L's level 1 is as fast as storing and compresses like zlib's level 1: a 1 mm
    float32 warped brain (34.7 MB) took 0.036 s to 7.1 MB against zlib's 0.277 s to
    7.2 MB (quiet 2-core AMD EPYC). Both write the standard gzip format.
    """
    try:
        from isal import igzip
    except ImportError:
        import gzip
        return gzip.open(path, "wb", compresslevel=compress_level)
    return igzip.open(path, "wb", compresslevel=1)


def read_flow(path: str, space: str = "auto"):
    """``(RAS field [X, Y, Z, 3] float32, the flow's NIfTI image, the space read)``."""
    import nibabel as nib

    if not os.path.isfile(path):
        raise WarpError(f"{path}: flow file not found")
    try:
        image = nib.load(path)
        data = np.asarray(image.dataobj, np.float32)
    except Exception as error:  # noqa: BLE001  nibabel raises many types
        raise WarpError(f"{path}: cannot read the flow ({' '.join(str(error).split())})") \
            from None
    if data.ndim == 5 and data.shape[3] == 1:
        data = data[:, :, :, 0, :]
    if data.ndim != 4 or data.shape[3] != 3:
        raise WarpError(f"{path}: flow has shape {image.shape}, expected [X, Y, Z, 1, 3] "
                        "(a displacement field as aldk-register writes it)")
    checks.check_geometry(image, path, "flow")
    if not np.isfinite(data).all():
        raise WarpError(f"{path}: {int((~np.isfinite(data)).sum())} flow value(s) are NaN "
                        "or infinite; expected a finite displacement field")
    if space == "auto":
        name = image.header.get_intent()[2].upper()
        found = [known for known in FLOW_SPACES if known.upper() in name.split()]
        if len(found) != 1:
            raise WarpError(f"{path}: intent name '{name}' does not say the flow's axes "
                            f"(expected '{FLOW_INTENT.format(space='RAS')}' or "
                            f"'{FLOW_INTENT.format(space='LPS')}'); pass --flow-space ras "
                            "or lps")
        space = found[0]
    elif space not in FLOW_SPACES:
        raise WarpError(f"--flow-space: expected auto or one of {FLOW_SPACES}, "
                        f"got '{space}'")
    return from_flow_space(data, space), image, space


# ----------------------------------------------------------------------------- geometry
#: Rows of the fixed grid's first axis warped at once (bounds the temporaries).
SLAB_ROWS = 24
#: Points per call of the compiled trilinear sampler (``linear``): every slab is padded to
#: a multiple of it, so that one compilation serves every slab of every fixed grid.
SAMPLE_CHUNK = 1 << 20


def moving_voxels(field_ras: np.ndarray, fixed_affine, moving_affine, start: int = 0,
                  shape=None, out: np.ndarray | None = None) -> np.ndarray:
    """Moving-image voxel coordinates ``[X, Y, Z, 3]`` (float32) of every fixed voxel; for
    a slab of the field (rows ``start:start + len(field_ras)`` of a grid of ``shape``),
    written into ``out`` when given.

    ``Mov^-1 (F x + u(x))`` computed as ``Mov^-1 u(x)`` plus the affine map
    ``Mov^-1 F x``, whose three components are sums of one vector per fixed axis."""
    shape = field_ras.shape[:3] if shape is None else shape
    stop = start + field_ras.shape[0]
    to_moving = np.linalg.inv(np.asarray(moving_affine, np.float64))
    grid_to_moving = to_moving @ np.asarray(fixed_affine, np.float64)
    points = np.empty(field_ras.shape, np.float32) if out is None else out
    np.matmul(field_ras, to_moving[:3, :3].T.astype(np.float32), out=points)
    axes = [np.arange(start, stop, dtype=np.float64), np.arange(shape[1], dtype=np.float64),
            np.arange(shape[2], dtype=np.float64)]
    for row in range(3):
        along = [(grid_to_moving[row, i] * axes[i]
                  + (grid_to_moving[row, 3] if i == 0 else 0.0)).astype(np.float32)
                 for i in range(3)]
        points[..., row] += (along[0][:, None, None] + along[1][None, :, None]
                             + along[2][None, None, :])
    return points


# ----------------------------------------------------------------------------- sampling
def sample_linear(volume: np.ndarray, coordinate: np.ndarray) -> np.ndarray:
    """:func:`aldk_tf.spatial.sample` (trilinear, edge-clamped) of a 3-D array ``[X, Y, Z]``
    or a 4-D one ``[X, Y, Z, C]`` (each channel) at voxel ``coordinate`` ``[..., 3]``."""
    import tensorflow as tf

    from aldk_tf import spatial

    volume = np.asarray(volume, np.float32)
    channels = volume if volume.ndim == 4 else volume[..., None]
    values = spatial.sample(tf.constant(channels[None]),
                            tf.constant(np.asarray(coordinate, np.float32)[None]))
    values = values.numpy()[0]
    return values if volume.ndim == 4 else values[..., 0]


def sample_labels(labels: np.ndarray, coordinate: np.ndarray,
                  rule: str = "threshold") -> np.ndarray:
    """:func:`aldk_tf.spatial.sample_labels` of a 3-D label array at voxel ``coordinate``:
    ``"threshold"`` is the evaluation's rule, ``"nearest"`` the nearest voxel's label."""
    import tensorflow as tf

    from aldk_tf import spatial

    labels = np.asarray(labels)
    values = spatial.sample_labels(tf.constant(labels[None, ..., None]),
                                   tf.constant(np.asarray(coordinate, np.float32)[None]),
                                   rule, label_values=np.unique(labels))
    return values.numpy()[0, ..., 0]


def label_array(data: np.ndarray, where: str) -> np.ndarray:
    """Integer labels in the narrowest of uint8, uint16, int16, int32 that holds them."""
    data = np.asarray(data, np.float64)
    labels = np.rint(data)
    if labels.size == 0:
        return labels.astype(np.uint8)
    checks.check_label_map(data, where)      # integers, not an intensity image
    low, high = labels.min(), labels.max()
    for dtype in (np.uint8, np.uint16, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return labels.astype(dtype)
    raise WarpError(f"{where}: label values {low:g}..{high:g} do not fit in int32")


def image_dtype(image) -> np.dtype:
    """The dtype a nearest-neighbour copy of ``image`` keeps: the file's stored type unless
    a scale factor makes the values something else."""
    header = getattr(image, "header", None)
    try:
        slope, inter = header.get_slope_inter()
    except (AttributeError, TypeError):
        slope, inter = None, None
    if slope not in (None, 1.0) or inter not in (None, 0.0):
        return np.asarray(image.dataobj).dtype
    return np.dtype(image.get_data_dtype())


def warp_volume(data: np.ndarray, field_ras: np.ndarray, fixed_affine, moving_affine,
                interpolation: str = "linear", where: str = "image",
                dtype=None) -> np.ndarray:
    """``data`` (on the grid of ``moving_affine``) at every fixed voxel ``p + u(p)``.

    The fixed grid is taken slab by slab of its first axis, so no full-grid array of
    coordinates is made: :data:`SLAB_ROWS` rows, or for ``linear`` as many as fill
    :data:`SAMPLE_CHUNK` points (the compiled sampler). ``linear``: float32; ``nearest``:
    the labels' values in ``dtype`` (default: the narrowest integer type that holds
    them); ``labels``: the evaluation's per-label rule, in the narrowest integer type.
    """
    import tensorflow as tf

    from aldk_tf import spatial

    if interpolation not in INTERPOLATIONS:
        raise WarpError(f"--interpolation: expected one of {INTERPOLATIONS}, "
                        f"got '{interpolation}'")
    shape = field_ras.shape[:3]
    rows, padded = SLAB_ROWS, None
    if interpolation == "linear":
        volume = tf.constant(np.asarray(data, np.float32)[None, ..., None])
        result = np.empty(shape, np.float32)
        plane = shape[1] * shape[2]
        rows = max(1, SAMPLE_CHUNK // max(plane, 1))
        padded = -(-rows * plane // SAMPLE_CHUNK) * SAMPLE_CHUNK
    else:
        labels = label_array(data, where)
        values = np.unique(labels)
        volume = tf.constant(labels[None, ..., None])
        result = np.empty(shape, labels.dtype)
    flat = None if padded is None else np.zeros((1, padded, 3), np.float32)
    for start in range(0, shape[0], rows):
        stop = min(start + rows, shape[0])
        if interpolation == "linear":        # into the padded buffer (the tail is unused)
            count = (stop - start) * shape[1] * shape[2]
            moving_voxels(field_ras[start:stop], fixed_affine, moving_affine, start, shape,
                          out=flat[0, :count].reshape(stop - start, *shape[1:], 3))
            slab = spatial.sample(volume, tf.constant(flat), compiled=True).numpy()
            result[start:stop] = slab[0, :count, 0].reshape(stop - start, *shape[1:])
            continue
        points = moving_voxels(field_ras[start:stop], fixed_affine, moving_affine, start,
                               shape)
        rule = "nearest" if interpolation == "nearest" else "threshold"
        slab = spatial.sample_labels(volume, tf.constant(points[None]), rule,
                                     label_values=values)
        result[start:stop] = slab.numpy()[0, ..., 0]
    if interpolation == "nearest" and dtype is not None:
        result = result.astype(dtype)
    return result


# ----------------------------------------------------------------------------- command
def warp_file(flow: str, image: str, out: str, interpolation: str = "linear",
              flow_space: str = "auto", overwrite: bool = False) -> dict:
    """Warp the NIfTI ``image`` by the saved ``flow`` onto the flow's (fixed) grid."""
    if interpolation not in INTERPOLATIONS:
        raise WarpError(f"--interpolation: expected one of {INTERPOLATIONS}, "
                        f"got '{interpolation}'")
    if os.path.exists(out) and not overwrite:
        raise WarpError(f"{out}: exists; pass --overwrite to replace it")
    if not out.endswith((".nii", ".nii.gz")):
        raise WarpError(f"{out}: expected a .nii or .nii.gz output name")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise WarpError(f"{out}: output folder {folder} does not exist or is not writable")
    import nibabel as nib

    field, reference, space = read_flow(flow, flow_space)
    moving = preprocess.load_image(image, "image to warp")
    warnings = []
    if interpolation == "linear" and (reason := checks.label_like(moving.dataobj)):
        warnings.append(f"{image}: looks like a label map ({reason}); linear "
                        "interpolation blends labels into values that are no label "
                        "(use --interpolation labels)")
    warped = warp_volume(np.asarray(moving.dataobj), field, reference.affine,
                         moving.affine, interpolation, image, dtype=image_dtype(moving))
    # The fixed grid's header, as a 3-D image (the flow's has the vector dimensions).
    fixed = nib.Nifti1Image(np.zeros(field.shape[:3], np.uint8), reference.affine,
                            header=reference.header.copy())
    result = nifti_like(fixed, warped)
    suffix = ".nii.gz" if out.endswith(".nii.gz") else ".nii"
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-warp-", suffix=suffix)
    os.close(handle)
    try:
        save_image(result, temporary)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, out)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    return {"out": out, "flow_space": space, "shape": list(warped.shape),
            "dtype": str(warped.dtype), "warnings": warnings}


if __name__ == "__main__":        # the command line lives in aldk_tf.cli (no main here)
    sys.exit("error: python -m aldk_tf.deploy.warp: the command is python -m "
             "aldk_tf.cli.warp (console script aldk-warp)")
