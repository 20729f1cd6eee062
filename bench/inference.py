"""Inference benchmark: full registration time per model and deployment path, one run.

    python bench/inference.py [--size 128] [--repeats 5] [--warmup 1]
                              [--rows ROW,ROW,...] [--json PATH] [--list]

Every row is one way of registering a (fixed, moving) pair of ``[1, S, S, S, 1]``
float32 volumes: networks + warps + flow composition as deployed; preprocessing (file
reading, resampling) excluded. A row is built (``keras.utils.set_random_seed(0)``,
randomly initialised weights: the time does not depend on the weights' values), called
``--warmup`` times (tracing, XLA compilation, TFLite allocation), then timed ``--repeats``
times with ``time.perf_counter`` around the call and the fetch of both outputs.

Row names: ``[savedmodel_ | savedmodel_portable_ | tflite_<fp32|fp16|int8>_]<model>
[_bf16 | _keras_upconv]``
with ``<model>`` one of ``teacher_affine_vtn1``, ``teacher_affine_vtn3``,
``student_1``, ``student_2``, ``student_3``, ``student_crd_1`` (cross-resolution,
1/2), plus the row ``warp`` (one trilinear warp of the image alone).

- ``<model>``: in-process, :func:`aldk_tf.deploy.inference.registration_function` (fixed
  input signature; flow heads as sub-pixel convolutions, float32).
- ``_bf16``: the same with the convolutions in bfloat16 (``dtype="bfloat16"``).
- ``_keras_upconv``: the Keras graph unchanged (``subpixel=False``), i.e. what the
  TFLite files are converted from (``export.py``'s SavedModel has the sub-pixel heads).
- ``savedmodel_``: the row's graph saved with :func:`aldk_tf.deploy.serving.save_savedmodel`
  to a temporary directory, reloaded with ``tf.saved_model.load``, called through its
  ``serving_default`` signature.
- ``savedmodel_portable_``: the same module saved with ``portable=True`` (``export.py
  --portable``, for TF Serving without XLA): the ``_XlaMustCompile`` marks stripped,
  which shows what the warps cost without XLA.
- ``tflite_<variant>_``: :func:`aldk_tf.deploy.serving.convert_tflite` of the model as
  ``export.py`` converts it, run by ``tf.lite.Interpreter(num_threads=2)``.

Per row: median / min / max wall milliseconds, median process CPU milliseconds (all
threads; steadier than wall time on a shared machine), parameters
(``parameter_report()["total"]``), and memory: ``rss`` is the process's resident memory
before the row's first call (model built, everything earlier in the process included),
``peak`` the process's peak resident memory during the row's calls (``VmHWM``, reset
through ``/proc/self/clear_refs`` before the first call), ``+call`` their difference
(what inference itself needed on top). These are process-level numbers; memory that
TensorFlow or the allocator kept from earlier rows counts in ``rss``.

The table ends with the teacher/student ratios, SavedModel/in-process ratios and the
graph check: for in-process and SavedModel rows, any op of
:data:`aldk_tf.deploy.inference.SLOW_OPS` in the graph, or gathers outside XLA.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import re
import sys
import tempfile
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from aldk_tf.deploy import export, serving  # noqa: E402

from aldk_tf import spatial  # noqa: E402
from aldk_tf.config import atomic_write_text  # noqa: E402
from aldk_tf.deploy.inference import registration_function, slow_ops  # noqa: E402
from aldk_tf.networks import build_student, build_teacher  # noqa: E402

try:                                 # python -m bench.<script>; imported from the root (tests)
    from bench.timing import repeat_timed
except ModuleNotFoundError:          # python bench/<script>.py: sys.path[0] is bench/
    from timing import repeat_timed

MODELS = {
    "teacher_affine_vtn1": lambda size: build_teacher(size, 1),
    "teacher_affine_vtn3": lambda size: build_teacher(size, 3),
    "student_1": lambda size: build_student(size, 1),
    "student_2": lambda size: build_student(size, 2),
    "student_3": lambda size: build_student(size, 3),
    "student_crd_1": lambda size: build_student(size, 1, resolution_factor=2),
}
DEFAULT_ROWS = (
    "warp",
    "teacher_affine_vtn1", "teacher_affine_vtn3",
    "student_1", "student_2", "student_3", "student_crd_1",
    "student_1_bf16", "student_3_bf16", "student_crd_1_bf16", "student_1_keras_upconv",
    "savedmodel_student_1", "savedmodel_student_3", "savedmodel_student_crd_1",
    "savedmodel_teacher_affine_vtn1", "savedmodel_student_1_keras_upconv",
    "savedmodel_portable_student_1", "savedmodel_portable_student_3",
    "tflite_fp32_student_1", "tflite_fp16_student_1", "tflite_int8_student_1",
)
#: (numerator, denominator) rows of the printed ratios.
RATIOS = (("teacher_affine_vtn1", "student_1"), ("teacher_affine_vtn3", "student_3"),
          ("teacher_affine_vtn3", "student_1"), ("teacher_affine_vtn3", "student_crd_1"),
          ("student_1", "student_crd_1"))
TFLITE_THREADS = 2
_ROW = re.compile(r"^(?:(?P<savedmodel>savedmodel_(?P<portable>portable_)?)|"
                  r"tflite_(?P<tflite>fp32|fp16|int8)_)?"
                  r"(?P<model>" + "|".join(MODELS) + r")(?P<variant>_bf16|_keras_upconv)?$")


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    source: str = "in-process"  # "in-process" | "savedmodel" | "savedmodel_portable" | "tflite"
                                #  | "warp"
    model: str | None = None
    dtype: str = "float32"
    subpixel: bool = True
    tflite: str | None = None


def parse_row(name: str) -> Row:
    """:class:`Row` of a row name; ``ValueError`` naming the grammar if it is unknown."""
    if name == "warp":
        return Row(name, source="warp")
    match = _ROW.match(name)
    if not match or (match["tflite"] and match["variant"]):
        raise ValueError(
            f"unknown row {name!r}: expected 'warp' or [savedmodel_ | savedmodel_portable_ | "
            f"tflite_<fp32|fp16|int8>_]<model>[_bf16 | _keras_upconv] with <model> one of "
            f"{', '.join(MODELS)} (TFLite rows take no suffix)")
    source = "in-process"
    if match["savedmodel"]:
        source = "savedmodel_portable" if match["portable"] else "savedmodel"
    elif match["tflite"]:
        source = "tflite"
    return Row(name, source=source, model=match["model"],
               dtype="bfloat16" if match["variant"] == "_bf16" else "float32",
               subpixel=match["variant"] != "_keras_upconv", tflite=match["tflite"])


# ----------------------------------------------------------------------------- inputs
def sample_pair(size: int) -> tuple[np.ndarray, np.ndarray]:
    """A smooth random (fixed, moving) pair ``[1, S, S, S, 1]`` in [0, 1]."""
    sample = export.synthetic_sample((size,) * 3, seed=0)
    return sample["fixed"].astype(np.float32), sample["moving"].astype(np.float32)


def smooth_flow(size: int, amplitude: float = 4.0) -> np.ndarray:
    """A smooth flow ``[1, S, S, S, 3]`` of up to ``amplitude`` voxels (sines)."""
    axis = np.arange(size, dtype=np.float32) * (2 * np.pi / size)
    z, y, x = np.meshgrid(axis, axis, axis, indexing="ij")
    flow = np.stack([np.sin(y + 1.0) * np.cos(x), np.sin(z + 2.0) * np.cos(x + 0.5),
                     np.sin(x + 3.0) * np.cos(z)], axis=-1)
    return (amplitude * flow[None]).astype(np.float32)


# ----------------------------------------------------------------------------- memory
def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            match = re.search(rf"^{field}:\s+(\d+) kB", handle.read(), re.MULTILINE)
        return int(match.group(1)) if match else None
    except OSError:
        return None


def reset_peak_memory() -> bool:
    """Reset the process's ``VmHWM`` to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------- rows
def build_model(row: Row, size: int):
    keras.utils.set_random_seed(0)
    return MODELS[row.model]((size,) * 3)


def prepare(row: Row, size: int, workdir: str):
    """``(run(fixed, moving) -> outputs, params, slow ops or None, keep-alive)``."""
    if row.source == "warp":
        image = tf.TensorSpec([1, size, size, size, 1], tf.float32)
        flow_spec = tf.TensorSpec([1, size, size, size, 3], tf.float32)
        warp = tf.function(spatial.warp, input_signature=[image, flow_spec])
        flow = tf.constant(smooth_flow(size))
        return (lambda fixed, moving: {"warped": warp(moving, flow)}), 0, \
            slow_ops(warp.get_concrete_function()), warp
    model = build_model(row, size)
    params = model.parameter_report()["total"]
    if row.source == "tflite":
        flatbuffer = serving.convert_tflite(model, row.tflite)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")         # tf.lite.Interpreter deprecation notice
            interpreter = tf.lite.Interpreter(model_content=flatbuffer,
                                              num_threads=TFLITE_THREADS)
        signature = interpreter.get_signature_runner(serving.SERVING_SIGNATURE)
        return (lambda fixed, moving: signature(fixed=fixed, moving=moving)), params, \
            None, interpreter
    register = registration_function(model, batch=1, dtype=row.dtype,
                                     subpixel=row.subpixel)
    if row.source == "in-process":
        return register, params, slow_ops(register.get_concrete_function()), register
    path = os.path.join(workdir, row.name)
    serving.save_savedmodel(register.graph, path,
                            portable=row.source == "savedmodel_portable")
    loaded = tf.saved_model.load(path)
    signature = loaded.signatures[serving.SERVING_SIGNATURE]
    return (lambda fixed, moving: signature(fixed=fixed, moving=moving)), params, \
        slow_ops(signature), loaded


def measure(run, fixed, moving, warmup: int, repeats: int) -> dict:
    def call():
        return {key: np.asarray(value) for key, value in run(fixed, moving).items()}
    rss = _status_kb("VmRSS")
    has_peak = reset_peak_memory()
    for _ in range(warmup):
        call()
    wall, cpu = repeat_timed(call, repeats)
    peak = _status_kb("VmHWM") if has_peak else None
    result = {"median_ms": 1e3 * float(np.median(wall)), "min_ms": 1e3 * min(wall),
              "max_ms": 1e3 * max(wall), "cpu_ms": 1e3 * float(np.median(cpu)),
              "repeats": repeats, "load_1min": round(os.getloadavg()[0], 2)}
    if rss is not None:
        result["rss_mb"] = rss / 1024
    if peak is not None and rss is not None:
        result.update(peak_mb=peak / 1024, peak_increase_mb=(peak - rss) / 1024)
    return result


def run_row(row: Row, size: int, fixed, moving, warmup: int, repeats: int,
            workdir: str) -> dict:
    run, params, slow, keep = prepare(row, size, workdir)
    if row.source != "tflite":
        fixed, moving = tf.constant(fixed), tf.constant(moving)
    result = measure(run, fixed, moving, warmup, repeats)
    result.update(params=int(params), source=row.source, dtype=row.dtype)
    if slow is not None:
        result["slow_ops"] = slow
    del run, keep
    keras.backend.clear_session()
    gc.collect()
    return result


# ----------------------------------------------------------------------------- report
def machine_description() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as handle:
            match = re.search(r"^model name\s*:\s*(.+)$", handle.read(), re.MULTILINE)
        model = match.group(1).strip() if match else model
    except OSError:
        pass
    onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1 (default)")
    return (f"{os.cpu_count()} CPUs ({model}), TensorFlow {tf.__version__}, Keras "
            f"{keras.__version__}, oneDNN opts {onednn}")


def ratios(results: dict) -> list[tuple[str, float, float]]:
    """``(label, ratio of median wall times, ratio of median CPU times)``."""
    pairs = list(RATIOS)
    for name in results:
        for prefix in ("savedmodel_", "savedmodel_portable_"):
            if name.startswith(prefix) and name[len(prefix):] in results:
                pairs.append((name, name[len(prefix):]))
        if name.endswith("_bf16") and name[:-len("_bf16")] in results:
            pairs.append((name, name[:-len("_bf16")]))
        if name.endswith("_keras_upconv") and name[:-len("_keras_upconv")] in results:
            pairs.append((name, name[:-len("_keras_upconv")]))
    return [(f"{a} / {b}", results[a]["median_ms"] / results[b]["median_ms"],
             results[a]["cpu_ms"] / results[b]["cpu_ms"])
            for a, b in pairs if a in results and b in results]


def format_table(results: dict) -> str:
    def mb(entry, key):
        return f"{entry[key]:,.0f}" if key in entry else "-"
    lines = [f"{'row':36s}{'median ms':>10s}{'min':>8s}{'max':>8s}{'cpu ms':>9s}"
             f"{'params':>12s}{'rss MB':>8s}{'peak MB':>9s}{'+call':>7s}{'load':>6s}"]
    for name, r in results.items():
        lines.append(f"{name:36s}{r['median_ms']:10.1f}{r['min_ms']:8.1f}{r['max_ms']:8.1f}"
                     f"{r['cpu_ms']:9.1f}{r['params']:12,d}{mb(r, 'rss_mb'):>8s}"
                     f"{mb(r, 'peak_mb'):>9s}{mb(r, 'peak_increase_mb'):>7s}"
                     f"{r['load_1min']:6.1f}")
    table_ratios = ratios(results)
    if table_ratios:
        lines.append("")
        lines.append(f"{'ratios of medians':60s}{'wall':>7s}{'cpu':>7s}")
        lines.extend(f"  {label:58s}{wall:7.2f}{cpu:7.2f}"
                     for label, wall, cpu in table_ratios)
    checked = {name: r["slow_ops"] for name, r in results.items() if "slow_ops" in r}
    if checked:
        lines.append("")
        lines.append("graph check (slow ops in the traced / exported graph):")
        for name, found in checked.items():
            lines.append(f"  {name}: " + ("none" if not found else "; ".join(
                f"{op} ({reason})" for op, reason in found.items())))
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=128, help="volume size S (S^3), "
                        "divisible by 32 for the cross-resolution rows (default 128)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per row")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first (>= 1)")
    parser.add_argument("--rows", help="comma-separated rows (default: all of --list)")
    parser.add_argument("--json", help="write {row: {median_ms, params, ...}} here")
    parser.add_argument("--list", action="store_true", help="print the default rows")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        print("\n".join(DEFAULT_ROWS))
        return 0
    names = [n.strip() for n in args.rows.split(",") if n.strip()] if args.rows \
        else list(DEFAULT_ROWS)
    try:
        rows = [parse_row(name) for name in dict.fromkeys(names)]
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.repeats < 1 or args.warmup < 1:
        print("error: --repeats and --warmup must be >= 1", file=sys.stderr)
        return 2
    if args.json:
        try:                  # checked now, not after minutes of measuring
            os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
            with tempfile.TemporaryFile(dir=os.path.dirname(os.path.abspath(args.json))):
                pass
        except OSError as error:
            print(f"error: --json {args.json}: cannot write there "
                  f"({error.strerror or error})", file=sys.stderr)
            return 2
    print(f"full registration of one {args.size}^3 pair (batch 1), randomly initialised "
          f"weights; median of {args.repeats} after {args.warmup} warm-up call(s)")
    print(f"machine: {machine_description()}; load average at start "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
    fixed, moving = sample_pair(args.size)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as workdir:
        for row in rows:
            started = time.perf_counter()
            try:
                results[row.name] = run_row(row, args.size, fixed, moving, args.warmup,
                                            args.repeats, workdir)
            except (ValueError, serving.ExportError) as error:
                print(f"{row.name}: failed: {error}", file=sys.stderr, flush=True)
                continue
            r = results[row.name]
            print(f"  {row.name}: {r['median_ms']:.1f} ms (row took "
                  f"{time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    print()
    print(format_table(results))
    print(f"\nload average at end {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if args.json:
        atomic_write_text(args.json, json.dumps(results, indent=2) + "\n")
    return 0 if len(results) == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
