"""Demo subjects written as NIfTI files, shared by the register, batch-register and warp
tests."""

import nibabel as nib

from aldk_tf.data import load_dataset_config, read_dataset


def demo_scans(dataset_json) -> dict:
    """The demo dataset's scans by id (``volume``, ``segmentation``, ``attrs["affine"]``)."""
    dataset = load_dataset_config(dataset_json)
    return read_dataset(dataset.resolve_file("demo"))


def save_nifti(path, data, affine) -> str:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return str(path)


def write_pair(folder, fixed_scan, moving_scan, fixed_affine, moving_affine) -> dict:
    """``fixed``, ``moving`` and ``moving_seg`` NIfTI files in ``folder``; their paths."""
    return {name: save_nifti(folder / f"{name}.nii.gz", data, affine)
            for name, data, affine in (
                ("fixed", fixed_scan["volume"], fixed_affine),
                ("moving", moving_scan["volume"], moving_affine),
                ("moving_seg", moving_scan["segmentation"], moving_affine))}
