"""End-to-end cost of ``aldk-register`` on a 1 mm brain pair, against ANTs SyN.

The pair: nilearn's ICBM 2009a template (1 mm, 197x233x189) as the fixed scan and the
MNI152 linear average ``avg152T1_brain`` (2 mm, LAS) resampled to 1 mm (181x217x181,
trilinear) as the moving one: skull-stripped T1s on different grids. Written once into
``--work``; nothing is downloaded.

Each round runs, as child processes, ``python -c "import tensorflow"`` then
``python -m aldk_tf.cli.register`` (shipped model, default outputs), and records each
one's wall time and peak resident memory (``os.wait4``); the cost beyond TensorFlow's
import is the paired difference of the two within a round (the machine's load drifts).
Then one ``--pairs`` batch of ``--batch-pairs`` rows: pairs per minute once the model is
loaded, from the pairs' own wall seconds in ``summary.csv`` (first pair left out: it
includes tracing). With ``--ants-python`` (a Python that imports antspyx), ANTs SyN
registers the same files (``ants.registration(type_of_transform="SyN")``, every core).

    python bench/register.py --moving-t1 avg152T1_brain.nii.gz --rounds 3 \\
        [--ants-python /path/to/python] --json bench/results/register-1mm.json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "aldk_tf" / "pretrained" / "brain_mr_64"

ANTS_SCRIPT = """
import sys, time
import ants
fixed, moving = ants.image_read(sys.argv[1]), ants.image_read(sys.argv[2])
start = time.perf_counter()
ants.registration(fixed=fixed, moving=moving, type_of_transform="SyN")
print(time.perf_counter() - start)
"""


def build_pair(work: Path, moving_t1: str) -> tuple[Path, Path]:
    """``fixed.nii.gz`` (ICBM 2009a, 1 mm) and ``moving.nii.gz`` (avg152 at 1 mm)."""
    import nibabel as nib
    from nilearn.datasets import load_mni152_template
    from scipy import ndimage

    work.mkdir(parents=True, exist_ok=True)
    fixed, moving = work / "fixed.nii.gz", work / "moving.nii.gz"
    if not fixed.exists():
        template = load_mni152_template(resolution=1)
        nib.save(nib.Nifti1Image(np.asarray(template.get_fdata(), np.float32),
                                 template.affine), fixed)
    if not moving.exists():
        source = nib.load(moving_t1)
        spacing = np.sqrt((source.affine[:3, :3] ** 2).sum(axis=0))
        shape = tuple(int((n - 1) * s) + 1 for n, s in zip(source.shape, spacing))
        target = source.affine @ np.diag([*(1.0 / spacing), 1.0])     # 1 mm, same origin
        index = np.indices(shape, dtype=np.float64).reshape(3, -1)
        to_source = np.linalg.inv(source.affine) @ target
        points = to_source[:3, :3] @ index + to_source[:3, 3:]
        data = ndimage.map_coordinates(np.asarray(source.get_fdata(), np.float32), points,
                                       order=1, mode="nearest").reshape(shape)
        nib.save(nib.Nifti1Image(data.astype(np.float32), target), moving)
    return fixed, moving


def run_child(command: list[str], env=None) -> dict:
    """Wall seconds, peak RSS (MB) and exit status of one child process."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=env)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    out, err = process.stdout.read().decode(), process.stderr.read().decode()
    process.stdout.close()
    process.stderr.close()
    process.returncode = os.waitstatus_to_exitcode(status)
    return {"seconds": wall, "peak_mb": usage.ru_maxrss / 1024.0,
            "code": process.returncode, "stdout": out, "stderr": err}


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--moving-t1", required=True, help="avg152T1_brain.nii.gz (2 mm)")
    parser.add_argument("--work", default="bench_work/register-1mm", help="pair and "
                        "outputs (default bench_work/register-1mm)")
    parser.add_argument("--model", default=str(MODEL), help="exported model (default: "
                        "the shipped brain_mr_64)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-pairs", type=int, default=6)
    parser.add_argument("--ants-python", help="a Python that imports antspyx (ANTs SyN "
                        "row; skipped without)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    work = Path(args.work)
    fixed, moving = build_pair(work, args.moving_t1)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    python = sys.executable
    loads = [load_average()]
    rounds = []
    for index in range(args.rounds):
        tf_import = run_child([python, "-c", "import tensorflow"], env)
        out = work / f"out{index}"
        register = run_child([python, "-m", "aldk_tf.cli.register", "--model", args.model,
                              "--fixed", str(fixed), "--moving", str(moving), "--out",
                              str(out), "--overwrite"], env)
        if register["code"] != 0:
            print(register["stderr"], file=sys.stderr)
            return 1
        with open(out / "registration.json") as handle:
            summary = json.load(handle)
        rounds.append({"tf_import_seconds": tf_import["seconds"],
                       "tf_import_peak_mb": tf_import["peak_mb"],
                       "register_seconds": register["seconds"],
                       "register_peak_mb": register["peak_mb"],
                       "beyond_tf_import_seconds": register["seconds"] - tf_import["seconds"],
                       "network_seconds": summary["network_seconds"],
                       "tf_lines_on_stderr": register["stderr"].count("\n")})
        loads.append(load_average())
        print(f"round {index + 1}: register {register['seconds']:.2f} s "
              f"({register['peak_mb']:.0f} MB), import tensorflow "
              f"{tf_import['seconds']:.2f} s, beyond it "
              f"{rounds[-1]['beyond_tf_import_seconds']:.2f} s, load {loads[-1]}")

    help_runs = [run_child([python, "-m", "aldk_tf.cli.register", "--help"], env)
                 for _ in range(3)]

    pairs_csv = work / "pairs.csv"
    with open(pairs_csv, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["fixed", "moving", "name"])
        for index in range(args.batch_pairs):
            first, second = (fixed, moving) if index % 2 == 0 else (moving, fixed)
            writer.writerow([first, second, f"pair{index}"])
    batch = run_child([python, "-m", "aldk_tf.cli.register", "--model", args.model,
                       "--pairs", str(pairs_csv), "--out", str(work / "batch"),
                       "--overwrite"], env)
    with open(work / "batch" / "summary.csv") as handle:
        walls = [float(row["wall_seconds"]) for row in csv.DictReader(handle)]
    loaded = walls[1:] if len(walls) > 1 else walls
    pairs_per_minute = 60.0 / statistics.mean(loaded)
    loads.append(load_average())
    print(f"--pairs: {len(walls)} pairs in {batch['seconds']:.1f} s, "
          f"{pairs_per_minute:.1f} pairs/min once loaded (peak {batch['peak_mb']:.0f} MB)")

    ants = None
    if args.ants_python:
        ants_run = run_child([args.ants_python, "-c", ANTS_SCRIPT, str(fixed), str(moving)])
        if ants_run["code"] == 0:
            ants = {"syn_seconds": float(ants_run["stdout"].split()[-1]),
                    "process_seconds": ants_run["seconds"], "peak_mb": ants_run["peak_mb"]}
            print(f"ANTs SyN: {ants['syn_seconds']:.1f} s (process {ants_run['seconds']:.1f}"
                  f" s, {ants_run['peak_mb']:.0f} MB)")
        else:
            print(f"ANTs SyN skipped: {ants_run['stderr'].strip()[-200:]}")
    loads.append(load_average())

    def median(key):
        return statistics.median(r[key] for r in rounds)

    results = {
        "command": " ".join(["python", "bench/register.py", *(argv or sys.argv[1:])]),
        "pair": {"fixed": "ICBM 2009a (nilearn) 197x233x189 1 mm",
                 "moving": "avg152T1_brain resampled to 1 mm 181x217x181"},
        "cpus": os.cpu_count(), "load_average_1_5_15": loads,
        "rounds": rounds,
        "median": {key: median(key) for key in rounds[0]},
        "help_seconds": [run["seconds"] for run in help_runs],
        "batch": {"pairs": len(walls), "process_seconds": batch["seconds"],
                  "peak_mb": batch["peak_mb"], "pair_wall_seconds": walls,
                  "pairs_per_minute_once_loaded": pairs_per_minute},
        "ants_syn": ants,
        "ratios": {"ants_syn_over_register_pair": None if ants is None else
                   ants["syn_seconds"] / statistics.mean(loaded)},
    }
    print(json.dumps(results["median"], indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
