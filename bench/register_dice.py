"""Dice through ``aldk-register`` on a 1 mm brain pair of two anatomies, against ANTs SyN.

The pair of ``bench/register.py``: nilearn's ICBM 2009a template (1 mm, 197x233x189) and
the MNI152 linear average ``avg152T1_brain`` resampled to 1 mm (181x217x181), each on its
own grid. B's content is first turned (10° and 6° about two axes), scaled by 0.93 and shifted by
6 mm on its grid (``--misalign``): the templates share MNI space, so without this they
would overlap before registration as two subjects' scans do not. Tissue labels (CSF, GM,
WM) come from one protocol applied to each scan alone:
a three-class Gaussian mixture of its brain intensities
(:func:`aldk_tf.data.anatomy.template_from_t1`). Both directions (A <- B, B <- A), mean
Dice of the three tissues on the fixed scan's grid:

- ``before``: the moving labels on the fixed grid through the scans' own world
  coordinates (no registration);
- ``student``: ``aldk-register`` with the model (``--model``, default the shipped one);
- ``student+refine<N>``: with ``--refine N`` on its default finer grid, and on the model's
  grid (``--refine-grid 1``);
- ``syn``: ANTs SyN (``ants.registration(type_of_transform="SyN")``, antspyx defaults,
  labels by ``genericLabel``) in ``--ants-python``'s environment.

Seconds are wall time per pair of the registration call (the model loaded once; scans
read from disk; outputs written), SyN's the registration's own. One caveat stated beside
the table: ICBM 2009a is the template the generator draws training pairs from, so only
avg152 is anatomy the network never saw.

    python bench/register_dice.py --moving-t1 avg152T1_brain.nii.gz \\
        --ants-python /path/to/antspyx/python --json bench/results/register-dice-1mm.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(p) for p in (HERE, HERE.parent) if str(p) not in sys.path]

from aldk_tf.config import atomic_write_text  # noqa: E402
from register import MODEL, build_pair  # noqa: E402

TISSUES = (1, 2, 3)
ANTS_SCRIPT = """
import json, sys, time
import ants
fixed, moving, labels = (ants.image_read(p) for p in sys.argv[1:4])
start = time.perf_counter()
result = ants.registration(fixed=fixed, moving=moving, type_of_transform="SyN")
seconds = time.perf_counter() - start
warped = ants.apply_transforms(fixed, labels, result["fwdtransforms"],
                               interpolator="genericLabel")
ants.image_write(warped, sys.argv[4])
print(json.dumps({"seconds": seconds}))
"""


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--moving-t1", required=True, help="avg152T1_brain.nii.gz")
    parser.add_argument("--model", default=str(MODEL))
    parser.add_argument("--work", default="/tmp/aldk-register-dice")
    parser.add_argument("--misalign", type=float, default=10.0, metavar="DEGREES",
                        help="turn, scale (0.93) and shift (6 mm) B's content first, as "
                             "scans of two subjects are (0: the templates as they are, "
                             "both in MNI space)")
    parser.add_argument("--refine", type=int, default=50)
    parser.add_argument("--ants-python", help="python with antspyx (default: no syn row)")
    parser.add_argument("--json", default=str(HERE / "results" / "register-dice-1mm.json"))
    parser.add_argument("--markdown", default=str(HERE / "results" /
                                                  "register-dice-1mm.md"))
    return parser.parse_args(argv)


def misaligned(path: Path, degrees: float, shift_mm: float, scale: float) -> Path:
    """``<stem>_misaligned.nii.gz``: the scan's content turned by ``degrees`` about two
    axes, scaled by ``scale`` and shifted by ``shift_mm`` along each axis (about the
    volume's centre; same grid and header), as two subjects' scans sit in their scanners
    (the two templates share MNI space: unregistered, they would already overlap)."""
    import nibabel as nib
    from scipy import ndimage
    out = path.with_name(path.name.replace(".nii.gz", "_misaligned.nii.gz"))
    if out.exists():
        return out
    image = nib.load(path)
    a, b = np.deg2rad(degrees), np.deg2rad(-0.6 * degrees)
    turn = (np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
            @ np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]]))
    spacing = np.linalg.norm(image.affine[:3, :3], axis=0)
    centre = (np.asarray(image.shape) - 1) / 2.0
    matrix = turn / scale                                   # output voxel -> input voxel
    offset = centre - matrix @ centre + np.array([1.0, -1.0, 0.5]) * shift_mm / spacing
    data = ndimage.affine_transform(np.asarray(image.dataobj, np.float32), matrix,
                                    offset=offset, order=1, mode="constant", cval=0.0)
    nib.save(nib.Nifti1Image(np.clip(data, 0, None), image.affine), out)
    return out


def tissue_labels(path: Path) -> Path:
    """``<stem>_seg.nii.gz``: CSF/GM/WM of the scan by the Gaussian-mixture protocol."""
    import nibabel as nib

    from aldk_tf.data.anatomy import template_from_t1
    out = path.with_name(path.name.replace(".nii.gz", "_seg.nii.gz"))
    if not out.exists():
        image = nib.load(path)
        labels = template_from_t1(np.asarray(image.dataobj, np.float64))["labels"]
        nib.save(nib.Nifti1Image(labels.astype(np.uint8), image.affine), out)
    return out


def dice(fixed_labels: np.ndarray, warped_labels: np.ndarray) -> float:
    scores = []
    for label in TISSUES:
        a, b = fixed_labels == label, warped_labels == label
        scores.append(2.0 * np.sum(a & b) / max(int(a.sum() + b.sum()), 1))
    return float(np.mean(scores))


def before_labels(fixed: Path, labels: Path) -> np.ndarray:
    """The moving labels on the fixed grid through world coordinates (nearest)."""
    import nibabel as nib
    from scipy import ndimage
    fixed_image, label_image = nib.load(fixed), nib.load(labels)
    to_moving = np.linalg.inv(label_image.affine) @ fixed_image.affine
    return ndimage.affine_transform(np.asarray(label_image.dataobj), to_moving[:3, :3],
                                    offset=to_moving[:3, 3], output_shape=fixed_image.shape,
                                    order=0, mode="constant", cval=0)


def main(argv=None) -> int:
    args = parse_args(argv)
    import nibabel as nib

    from aldk_tf.deploy.register import Registrar, write_registration
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    a, b = build_pair(work, args.moving_t1)
    if args.misalign:
        b = misaligned(b, args.misalign, 6.0, 0.93)
    scans = {"A": (a, tissue_labels(a)), "B": (b, tissue_labels(b))}
    command = "python bench/register_dice.py " + shlex.join(sys.argv[1:] if argv is None
                                                          else argv)
    variants = {"student": {}, f"student+refine{args.refine}": {"refine": args.refine},
                f"student+refine{args.refine}@model-grid": {"refine": args.refine,
                                                            "refine_grid": 1}}
    registrars = {name: Registrar(args.model, **options) for name, options in
                  variants.items()}
    rows: dict[str, dict] = {}
    for direction, (fixed_key, moving_key) in (("A <- B", ("A", "B")),
                                               ("B <- A", ("B", "A"))):
        (fixed, fixed_seg), (moving, moving_seg) = scans[fixed_key], scans[moving_key]
        fixed_labels = np.asarray(nib.load(fixed_seg).dataobj)
        rows.setdefault("before", {})[direction] = {
            "dice": dice(fixed_labels, before_labels(fixed, moving_seg)), "seconds": 0.0}
        for name, registrar in registrars.items():
            registrar.register(fixed, moving, moving_seg=moving_seg)      # warm-up
            out = work / f"{name}-{fixed_key}{moving_key}"
            start = time.perf_counter()
            result = registrar.register(fixed, moving, moving_seg=moving_seg)
            write_registration(result, str(out), overwrite=True)
            seconds = time.perf_counter() - start
            warped = np.asarray(nib.load(out / "warped_seg.nii.gz").dataobj)
            rows.setdefault(name, {})[direction] = {"dice": dice(fixed_labels, warped),
                                                    "seconds": seconds}
            print(f"[register-dice] {direction} {name}: {rows[name][direction]}",
                  file=sys.stderr)
        cached = work / f"syn-{fixed.name}-{moving.name}.json"    # SyN is the model's peer:
        if args.ants_python and cached.exists():                  # run once per pair
            rows.setdefault("syn", {})[direction] = json.loads(cached.read_text())
        elif args.ants_python:
            with tempfile.TemporaryDirectory() as folder:
                out = os.path.join(folder, "warped_seg.nii.gz")
                done = subprocess.run([args.ants_python, "-c", ANTS_SCRIPT, str(fixed),
                                       str(moving), str(moving_seg), out], check=True,
                                      capture_output=True, text=True)
                warped = np.asarray(nib.load(out).dataobj)
                rows.setdefault("syn", {})[direction] = {
                    "dice": dice(fixed_labels, warped),
                    "seconds": json.loads(done.stdout.strip().splitlines()[-1])["seconds"]}
            atomic_write_text(str(cached), json.dumps(rows["syn"][direction]) + "\n")
            print(f"[register-dice] {direction} syn: {rows['syn'][direction]}",
                  file=sys.stderr)
    directions = ("A <- B", "B <- A")
    lines = [f"`{command}`", "", "| row | " + " | ".join(
        f"{d} Dice | share of SyN's gain | s/pair" for d in directions) + " |",
        "|---|" + "---:|---:|---:|" * len(directions)]
    for name, row in rows.items():
        cells = []
        for d in directions:
            share = ""
            if "syn" in rows:
                gain = rows["syn"][d]["dice"] - rows["before"][d]["dice"]
                share = f"{100 * (row[d]['dice'] - rows['before'][d]['dice']) / gain:.0f} %"
            cells.append(f"{row[d]['dice']:.3f} | {share} | {row[d]['seconds']:.1f}")
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    atomic_write_text(args.markdown, "\n".join(lines) + "\n")
    atomic_write_text(args.json, json.dumps({"command": command, "rows": rows,
                                             "pair": {"A": a.name, "B": b.name}},
                                            indent=2) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
