"""How ``aldk-register`` prepares new scans: the model's recorded preprocessing, overridden
by flags, checked against what the model's training data went through.

The model's ``export_info.json`` records the settings its training data was prepared with
(``aldk-prep`` stores them in the dataset JSON, training copies them into the run's
``config.json``, export into ``export_info.json``). :func:`resolve_preprocessing` starts
from them and applies the flags (:func:`add_preprocessing_arguments`), :func:`scan_crop`
chooses the crop rule; a request the model's data preparation contradicts raises
:class:`RegisterError` with one line.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np

from aldk_tf.data import DataError, preprocess


class RegisterError(ValueError):
    """A registration request that cannot be carried out (one-line message)."""


#: Flags of register that override the model's recorded preprocessing.
OVERRIDABLE = ("crop", "margin", "intensity", "window", "percentiles", "threshold")
#: What must be stated by flags for a model that records no preprocessing.
REQUIRED_WITHOUT_RECORD = ("modality", "crop", "margin", "intensity")


def resolve_preprocessing(info: dict, size, overrides: dict | None = None,
                          with_masks: bool = False):
    """``(PreprocessSettings, notes)`` for new scans of a model.

    The model's recorded settings (``export_info.json``'s ``preprocessing``, written from
    the training data's JSON) are the default; ``overrides`` (flag name -> value, None =
    not given) replace single settings, except the modality, which cannot differ. Raises
    :class:`RegisterError` for a request the model's data preparation contradicts.
    """
    overrides = {key: value for key, value in (overrides or {}).items()
                 if value is not None}
    notes = []
    recorded = info.get("preprocessing")
    if recorded is None:
        check_stated(info, overrides)
        settings = preprocess.PreprocessSettings(size=size, used_masks=with_masks,
                                                 modality=overrides["modality"])
        notes.append("the model records no preprocessing; prepared as the flags state")
    else:
        try:
            settings = preprocess.PreprocessSettings.from_dict(
                recorded, where="export_info.json: 'preprocessing'")
        except DataError as error:
            raise RegisterError(str(error)) from None
        modality = overrides.get("modality")
        if modality is not None and modality != settings.modality:
            raise RegisterError(f"--modality {modality}: the model was trained on "
                                f"{settings.modality.upper()} scans (its preprocessing: "
                                f"{settings.describe()}); drop --modality")
        if tuple(settings.size) != tuple(size):
            raise RegisterError(f"export_info.json: preprocessing size {settings.size} "
                                f"differs from the model's input {tuple(size)}")
    for key in OVERRIDABLE:
        if key in overrides and recorded is not None:
            value = overrides[key]
            old = getattr(settings, key)
            if tuple(np.atleast_1d(value)) != tuple(np.atleast_1d(old)):
                notes.append(f"--{key} {_flag_text(value)} overrides the model's "
                             f"{_flag_text(old)}")
        if key in overrides:
            try:
                settings = replace(settings, **{key: overrides[key]})
            except DataError as error:
                reason = str(error).removeprefix(f"{key}: ")
                raise RegisterError(f"--{key}: {reason}") from None
    return settings, notes


def check_stated(info: dict, overrides: dict | None = None) -> None:
    """:class:`RegisterError` (one line naming the flags) for a model whose
    ``export_info.json`` records no preprocessing, unless flags state all of it."""
    if info.get("preprocessing") is not None:
        return
    given = {key for key, value in (overrides or {}).items() if value is not None}
    missing = [f"--{key}" for key in REQUIRED_WITHOUT_RECORD if key not in given]
    if missing:
        raise RegisterError(
            "the model's export_info.json records no preprocessing (how its training scans "
            "were prepared), so new scans cannot be prepared the same way; state it with "
            + ", ".join(missing) + " (e.g. --modality mr --crop nonzero --margin 2 "
            "--intensity percentiles), or export the model from a run whose dataset JSON "
            "records it")


def _flag_text(value) -> str:
    return " ".join(f"{v:g}" if isinstance(v, float) else str(v)
                    for v in np.atleast_1d(value).tolist())


def scan_crop(settings, crop_given: bool, with_masks: bool) -> str:
    """The explicit crop rule for :func:`aldk_tf.data.preprocess.preprocess_scan`, or a
    :class:`RegisterError` when the scans cannot be prepared as the model's were."""
    crop = settings.crop if crop_given else settings.effective_crop
    if crop == "auto":                  # given as a flag: the preparation's own rule
        crop = "mask" if with_masks else ("threshold" if settings.modality == "ct"
                                          else "nonzero")
    if crop == "label":
        raise RegisterError("the model's training scans were cropped to their label maps "
                            "(crop label), which registration cannot reproduce; pass "
                            "--crop (e.g. nonzero, threshold or none)")
    needs_masks = crop == "mask" or (settings.used_masks and settings.modality == "mr"
                                     and not crop_given)
    if needs_masks and not with_masks:
        raise RegisterError("the model's training scans were prepared with masks (crop "
                            f"{crop}, MR percentiles inside the mask); pass --fixed-mask "
                            "and --moving-mask (or --crop to choose another rule)")
    if with_masks and not (settings.used_masks or crop == "mask"):
        raise RegisterError("the model's training scans were prepared without masks; "
                            "drop --fixed-mask/--moving-mask (or pass --crop mask to crop "
                            "to them anyway)")
    return crop


def check_prepared(scan, settings, path: str) -> None:
    """:class:`RegisterError` when the preparation leaves nothing to register."""
    if scan.volume.min() == scan.volume.max():
        low, high = scan.intensity_range
        raise RegisterError(f"{path}: every voxel maps to {scan.volume.min()} under the "
                            f"model's preprocessing ({settings.describe()}; intensities "
                            f"{low:g}..{high:g} -> 0..255); expected a "
                            f"{settings.modality.upper()} scan like the training data")


def add_preprocessing_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags that override the model's recorded preprocessing (default: the model's)."""
    group = parser.add_argument_group(
        "preprocessing", "default: the settings the model's training data was prepared "
        "with (export_info.json); a flag overrides one setting. A model that records "
        "none needs --modality, --crop, --margin and --intensity")
    group.add_argument("--modality", choices=preprocess.MODALITIES,
                       help="must match the model's when it records one")
    group.add_argument("--crop", choices=preprocess.CROPS, help="crop rule")
    group.add_argument("--margin", type=int, help="voxels around the crop box")
    group.add_argument("--intensity", choices=preprocess.INTENSITIES,
                       help="intensities to 0..255: window (CT), percentiles (MR), max "
                       "(0..the scan's maximum), auto (window for CT, percentiles for MR)")
    group.add_argument("--window", type=float, nargs=2, metavar=("LOW", "HIGH"),
                       help="CT window in HU")
    group.add_argument("--percentiles", type=float, nargs=2, metavar=("LOW", "HIGH"),
                       help="MR percentiles mapped to 0 and 255")
    group.add_argument("--threshold", type=float, help="CT body threshold (HU) of the "
                       "threshold crop")
    group.add_argument("--fixed-mask", "--fixed_mask", dest="fixed_mask",
                       help="brain/organ mask of the fixed image (NIfTI, its grid)")
    group.add_argument("--moving-mask", "--moving_mask", dest="moving_mask",
                       help="brain/organ mask of the moving image (NIfTI, its grid)")


def preprocessing_overrides(args: argparse.Namespace) -> dict:
    return {key: getattr(args, key) for key in ("modality", *OVERRIDABLE)}
