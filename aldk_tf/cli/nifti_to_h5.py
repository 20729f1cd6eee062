"""Convert a folder of NIfTI scans (+ optional labels / masks) into an RCN-layout dataset.

    python data_prep/nifti_to_h5.py --images scans/ --labels labels/ --out datasets/mybrain \\
        --size 128 --modality mr --val 4 --test 4

writes ``datasets/mybrain.h5`` (one group per scan, named after the image file) and
``datasets/mybrain.json`` (subsets ``<name>-train``, ``-val``, ``-test``; schemes "1", "2",
"test"). Labels and masks are matched to images by file name only (without .nii/.nii.gz,
after removing ``--label-suffix`` / ``--mask-suffix``, e.g. ``_seg``): an image without its
file, or a file without its image, is an error naming them (never a match by order). Each
scan's world affine and crop box are kept as HDF5 attributes (see
``aldk_tf/data/preprocess.py``); the preprocessing settings are stored in the JSON as
``"preprocessing"``, so a model trained on the set registers new scans prepared the same
way (``aldk-register``). Labels may take values 0..65535 (uint16 above 255). Errors
print ``error: ...`` and exit with status 2; no output file is written unless every scan
converts.

Installed, the same tool is the console script ``aldk-prep``.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import sys
from pathlib import Path

import numpy as np

from aldk_tf.data import (TRAINING_SCHEME, VALIDATION_SCHEME, DataError, DatasetWriter,
                          write_dataset_config)
from aldk_tf.data import checks, preprocess

NIFTI_SUFFIXES = (".nii.gz", ".nii", ".img", ".hdr", ".mgz")


def scan_id(path: Path) -> str:
    """File name without its NIfTI suffix."""
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[:-len(suffix)]
    return path.stem


def find_files(patterns: list[str], what: str) -> list[Path]:
    """Expand directories (their *.nii / *.nii.gz, or else their subfolders, each one
    DICOM series named after the folder), globs and plain paths, sorted."""
    files = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            found = [p for p in path.iterdir() if p.is_file() and
                     p.name.endswith((".nii", ".nii.gz"))]
            if not found:                      # subfolders: one DICOM series each
                found = [p for p in path.iterdir() if p.is_dir()]
            if not found:
                raise DataError(f"{path}: no .nii or .nii.gz files (or DICOM series "
                                f"subfolders) in this {what} folder")
        elif any(ch in pattern for ch in "*?["):
            found = [Path(p) for p in glob.glob(pattern)]
            if not found:
                raise DataError(f"{pattern}: no {what} files match")
        elif path.is_file():
            found = [path]
        else:
            raise DataError(f"{path}: {what} file or folder not found")
        files.extend(found)
    files = sorted(dict.fromkeys(files))
    ids = [scan_id(f) for f in files]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise DataError(f"{patterns[0]}: several {what} files share the name "
                        f"{duplicates[0]!r}; scan ids must be unique")
    return files


def match(images: list[Path], others: list[Path], what: str,
          suffix: str = "") -> dict[str, Path]:
    """Map image scan ids to ``others`` of the same name (``<id><suffix>``) only."""
    by_id = {}
    for path in others:
        name = scan_id(path)
        by_id[name[:-len(suffix)] if suffix and name.endswith(suffix) else name] = path
    ids = [scan_id(p) for p in images]
    missing = [i for i in ids if i not in by_id]
    unused = sorted(str(by_id[i].name) for i in set(by_id) - set(ids))
    if missing:
        extra = f"; unmatched {what} files: {', '.join(unused[:3])}" if unused else ""
        raise DataError(f"{others[0].parent}: no {what} file named like image "
                        f"'{missing[0]}' ({len(missing)} image(s) without one){extra}; "
                        f"{what}s are matched by name only (see --{what}-suffix)")
    if unused:
        raise DataError(f"{others[0].parent}: {what} file(s) {', '.join(unused[:3])} match "
                        f"no image; name each after its image (see --{what}-suffix)")
    return {i: by_id[i] for i in ids}


def split(ids: list[str], val: int, test: int, seed: int) -> dict[str, list[str]]:
    """Seeded random split into train / val / test (train keeps the rest, sorted)."""
    if seed < 0:
        raise DataError(f"--seed: expected an integer >= 0, got {seed}")
    if val < 0 or test < 0 or val + test > len(ids) - 2:
        raise DataError(f"--val {val} --test {test}: need at least two training scans "
                        f"(a pair) out of {len(ids)}")
    checks.check_subset_count("--val", val)
    checks.check_subset_count("--test", test)
    order = np.random.default_rng(seed).permutation(len(ids))
    chosen = [ids[i] for i in order]
    return {"train": sorted(chosen[val + test:]), "val": sorted(chosen[:val]),
            "test": sorted(chosen[val:val + test])}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", nargs="+", required=True,
                        help="folder(s), glob(s) or files of NIfTI scans; a folder "
                        "without NIfTI files: its subfolders, one DICOM series each "
                        "(needs pydicom)")
    parser.add_argument("--labels", nargs="+", help="label images on the scans' grids")
    parser.add_argument("--masks", nargs="+", help="brain/organ masks for cropping")
    parser.add_argument("--label-suffix", "--label_suffix", dest="label_suffix", default="",
                        help="label files are named <image name><suffix> (e.g. _seg)")
    parser.add_argument("--mask-suffix", "--mask_suffix", dest="mask_suffix", default="",
                        help="mask files are named <image name><suffix> (e.g. _mask)")
    parser.add_argument("--out", required=True,
                        help="output stem: writes OUT.h5 and OUT.json")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing OUT.h5 / OUT.json")
    parser.add_argument("--size", type=int, nargs="+", default=[preprocess.DEFAULT_SIZE],
                        help="target size: one int (cubic) or three (default 128)")
    parser.add_argument("--modality", choices=preprocess.MODALITIES, default="mr")
    parser.add_argument("--crop", choices=preprocess.CROPS, default="auto",
                        help="auto: mask if given, else non-zero box (mr) / body "
                             "threshold box (ct)")
    parser.add_argument("--margin", type=int, default=2, help="voxels around the crop box")
    parser.add_argument("--window", type=float, nargs=2, default=preprocess.CT_WINDOW,
                        metavar=("LOW", "HIGH"), help="CT window in HU (default -200 300)")
    parser.add_argument("--percentiles", type=float, nargs=2,
                        default=preprocess.MR_PERCENTILES, metavar=("LOW", "HIGH"),
                        help="MR intensity percentiles mapped to 0 and 255")
    parser.add_argument("--threshold", type=float, default=preprocess.CT_BODY_THRESHOLD,
                        help="CT crop: HU threshold of the body region (default -500)")
    parser.add_argument("--binary-labels", action="store_true",
                        help="store labels as 0/255 masks (liver style) instead of values")
    parser.add_argument("--val", type=int, default=0, help="scans in the validation set")
    parser.add_argument("--test", type=int, default=0, help="scans in the test set")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split")
    parser.add_argument("--prefix", help="file prefix in the JSON (default: OUT's name)")
    parser.add_argument("--image-type",
                        help="image_type in the JSON (default: brain for mr, liver for ct)")
    args = parser.parse_args(argv)
    if len(args.size) not in (1, 3):
        parser.error("--size takes one or three integers")
    return args


def convert(args: argparse.Namespace) -> Path:
    out = Path(args.out)
    if out.suffix in (".h5", ".json"):
        out = out.with_suffix("")
    name = out.name
    h5_path, json_path = out.parent / f"{name}.h5", out.parent / f"{name}.json"
    prefix = args.prefix or name
    for path in (h5_path, json_path):
        if path.is_dir():
            raise DataError(f"{path}: a folder; --out expects the stem of two new files")
        if path.exists() and not args.overwrite:
            raise DataError(f"{path}: exists; pass --overwrite to replace it")
    images = find_files(args.images, "image")
    labels = (match(images, find_files(args.labels, "label"), "label", args.label_suffix)
              if args.labels else {})
    masks = (match(images, find_files(args.masks, "mask"), "mask", args.mask_suffix)
             if args.masks else {})
    size = args.size * 3 if len(args.size) == 1 else args.size
    size_warning = checks.check_network_size("--size", args.size)
    settings = preprocess.PreprocessSettings(
        modality=args.modality, crop=args.crop, margin=args.margin, window=args.window,
        percentiles=args.percentiles, threshold=args.threshold, size=size,
        binary_label=args.binary_labels, used_masks=bool(masks))
    parts = split([scan_id(p) for p in images], args.val, args.test, args.seed)
    subsets = {f"{name}-{part}": [f"{prefix}/{i}" for i in ids]
               for part, ids in parts.items() if ids}
    schemes = {TRAINING_SCHEME: {f"{name}-train": 1.0}}
    if parts["val"]:
        schemes[VALIDATION_SCHEME] = {f"{name}-val": 1.0}
    if parts["test"]:
        schemes["test"] = {f"{name}-test": 1.0}

    found_labels: set[int] = set()
    warnings = [size_warning] if size_warning else []
    seen: dict[bytes, Path] = {}         # volume digest -> image: no scan twice
    with DatasetWriter(h5_path) as writer:
        for index, image in enumerate(images, 1):
            key = scan_id(image)
            scan = preprocess.preprocess_scan(
                image, label=labels.get(key), mask=masks.get(key),
                **settings.scan_arguments())
            digest = hashlib.sha256(scan.volume.tobytes()).digest()
            if digest in seen:
                raise DataError(f"{image}: prepares to the very volume {seen[digest]} "
                                "does; expected different scans (a scan paired with a "
                                "copy of itself says nothing)")
            seen[digest] = image
            if scan.segmentation is not None:
                empty = checks.empty_labels_warning(scan.segmentation, str(labels[key]))
                warnings += [empty] if empty else []
            writer.add(key, scan.volume, segmentation=scan.segmentation, attrs=scan.attrs())
            if scan.segmentation is not None:
                found_labels.update(np.unique(scan.segmentation).tolist())
            box = "x".join(str(int(b - a)) for a, b in zip(scan.crop_start, scan.crop_stop))
            print(f"[{index}/{len(images)}] {key}: crop {box} -> "
                  f"{'x'.join(map(str, size))}")
        if labels and not found_labels - {0}:          # inside: no file is written
            raise DataError(f"{args.labels[0]}: every label map is empty (all voxels 0); "
                            "expected label maps that hold labels")
    class_values = None
    if labels and not args.binary_labels:
        class_values = {str(v): int(v) for v in sorted(found_labels - {0})} or None
    config = write_dataset_config(
        json_path, files={prefix: {"type": "HDF5", "path": h5_path.name}},
        subsets=subsets, schemes=schemes, image_size=size,
        image_type=args.image_type or ("brain" if args.modality == "mr" else "liver"),
        segmentation_class_value=class_values, preprocessing=settings.to_dict())
    print(f"wrote {h5_path} and {json_path}: "
          + ", ".join(f"{k} {len(v)}" for k, v in subsets.items()))
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return config.path


def main(argv=None) -> int:
    args = parse_args(argv)
    folder = Path(args.out).parent
    existed = folder.exists()
    try:
        convert(args)
    except (DataError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        if not existed:                         # the output folder this run made
            with contextlib.suppress(OSError):
                folder.rmdir()
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
