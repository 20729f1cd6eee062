"""Inference benchmark: full registration time per model and deployment path, one run.

    python bench/inference.py [--size 128] [--repeats 5] [--warmup 1]
                              [--rows ROW,ROW,...] [--json PATH] [--list]
                              [--peak full|quick|off] [--bf16 auto|on|off]
                              [--paired-rounds 7]

Every row is one way of registering a (fixed, moving) pair of ``[1, S, S, S, 1]``
float32 volumes: networks + warps + flow composition as deployed; preprocessing (file
reading, resampling) excluded. A row is built (``keras.utils.set_random_seed(0)``,
randomly initialised weights: the time does not depend on the weights' values), called
``--warmup`` times (tracing, XLA compilation, TFLite allocation), then timed ``--repeats``
times with ``time.perf_counter`` around the call and the fetch of both outputs.

Row names: ``[savedmodel_ | savedmodel_portable_ | tflite_<fp32|fp16|int8>_]<model>
[_bf16 | _keras_upconv][+refine<N>][@b<N>]``
with ``<model>`` one of ``teacher_affine_vtn1``, ``teacher_affine_vtn3``,
``student_1``, ``student_2``, ``student_3``, ``student_crd_1`` (cross-resolution,
1/2), ``voxelmorph_1`` (the peer network: ``train.py -b VoxelMorph -n 1``, i.e. the VTN
affine stem and one VoxelMorph cascade), plus the rows ``warp`` (one trilinear warp of
the image alone) and ``ants_syn`` (the peer method: ANTs SyN, affine + deformable, through
``antspyx`` -- the optional extra ``pip install 'aldk-tf[bench]'`` -- on the same pair,
``--ants-repeats`` timed calls without warm-up; "skipped: antspyx not installed" when it
is absent). Under the table: "N x faster than VoxelMorph, M x faster than ANTs SyN" for
``student_crd_1`` and ``student_1`` (``"peers"`` in the JSON).

- ``<model>``: in-process, :func:`aldk_tf.deploy.inference.registration_function` (fixed
  input signature; flow heads as sub-pixel convolutions, float32).
- ``_bf16``: the same with the convolutions in bfloat16 (``dtype="bfloat16"``). Built
  only where the CPU has native bfloat16 (``amx_bf16`` or ``avx512_bf16`` in
  ``/proc/cpuinfo``) or with ``--bf16 on`` (default ``$ALDK_BF16`` or ``auto``); otherwise
  the row says ``skipped:`` and why.
- ``@b<N>`` (throughput rows, not TFLite): the same graph traced for batch ``N`` (the
  pair repeated ``N`` times); ``pairs_per_s`` = N / median seconds, listed per batch
  under the table (what a serving team sizes hardware with).
- ``+refine<N>`` (in-process only): the row's registration, then ``N`` steps of test-time
  refinement of its flow (:func:`aldk_tf.training.refine.refine_flow`, default step size)
  and the warp by the refined flow -- what ``register --refine N`` runs. Under the table:
  the added time per step (iterations vs time; the study's Dice per step count is in
  README.md). The refinement's arithmetic is not counted in the row's GFLOP.
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

Distance to the machine's limit, measured in the same process: before the rows,
``--peak full`` times a 2048^2 ``tf.matmul`` and a 1x1x1 ``Conv3D`` (64^3 x 128 channels)
in float32 and bfloat16 (median of ``--repeats``, TensorFlow's default threads) and the
memory bandwidth (STREAM-style scale and sum over 256 MB arrays, one thread per core;
:mod:`bench.machine`). Per network row: ``work_gflop``, the convolutions' and dense
layers' FLOP as the row runs them (2 per multiply-add, sub-pixel flow heads in their
convolution form; :mod:`bench.work`), ``gflops`` = work / median time and
``peak_fraction`` = ``gflops`` / the larger of the two micro-benchmarks of the row's
dtype. The ``warp`` row: ``bytes`` it must move (20 per voxel: image and flow read,
result written), ``bound_ms`` = bytes / scale bandwidth, ``peak_fraction`` = ``bound_ms``
/ median. ``--peak quick`` only checks that the micro-benchmarks run (tiny sizes, not a
peak); ``--json`` writes ``{"machine": {...}, "rows": {row: {...}}, "peers": {...}, "ratios":
{"a / b": {"wall", "cpu", "paired", "paired_cpu", "rounds"}}, "refinement": {row:
{"steps", "ms_per_step"}}}``.

The table ends with ratios: of the rows' medians, and ``paired`` -- after all rows, the two
rows of each ratio called in alternation (a b, b a, ...) for ``--paired-rounds`` rounds,
the median of the per-round ratios (rows measured minutes apart see a shared machine at
different speeds; back-to-back calls see the same one). Ratios: :data:`RATIOS` (teacher /
student, the cross-resolution student over the full-resolution one and over the warp, the
full-resolution student over the warp, peers), every SavedModel row over its in-process
row, every ``_bf16`` / ``_keras_upconv`` / ``+refine`` row over the row without it
(``ants_syn`` and ``+refine`` rows are not paired: seconds per call; the paired rows keep
their models loaded until then, so the process grows by a few GB over a full run;
``--paired-rounds 0`` turns pairing off). Then the graph check: for in-process and
SavedModel rows, any op of :data:`aldk_tf.deploy.inference.SLOW_OPS` in the graph, or
gathers outside XLA.
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
from aldk_tf.training.refine import refine_flow  # noqa: E402

try:                                 # python -m bench.<script>; imported from the root (tests)
    from bench import machine
    from bench.timing import repeat_timed
    from bench.work import count_work
except ModuleNotFoundError:          # python bench/<script>.py: sys.path[0] is bench/
    import machine
    from timing import repeat_timed
    from work import count_work

MODELS = {
    "teacher_affine_vtn1": lambda size: build_teacher(size, 1),
    "teacher_affine_vtn3": lambda size: build_teacher(size, 3),
    "student_1": lambda size: build_student(size, 1),
    "student_2": lambda size: build_student(size, 2),
    "student_3": lambda size: build_student(size, 3),
    "student_crd_1": lambda size: build_student(size, 1, resolution_factor=2),
    # The peer a user would train instead: train.py -b VoxelMorph -n 1 (VTN affine stem +
    # one VoxelMorph cascade).
    "voxelmorph_1": lambda size: build_teacher(size, 1, base="voxelmorph"),
}
DEFAULT_ROWS = (
    "warp",
    "teacher_affine_vtn1", "teacher_affine_vtn3",
    "student_1", "student_2", "student_3", "student_crd_1",
    "voxelmorph_1", "ants_syn",
    "student_1_bf16", "student_3_bf16", "student_crd_1_bf16", "student_1_keras_upconv",
    "student_1+refine10", "student_1+refine25", "student_1+refine50",
    "student_1@b2", "student_1@b4", "student_crd_1@b2", "student_crd_1@b4",
    "savedmodel_student_1", "savedmodel_student_3", "savedmodel_student_crd_1",
    "savedmodel_student_1@b2", "savedmodel_student_1@b4",
    "savedmodel_student_crd_1@b2", "savedmodel_student_crd_1@b4",
    "savedmodel_teacher_affine_vtn1", "savedmodel_student_1_keras_upconv",
    "savedmodel_portable_student_1", "savedmodel_portable_student_3",
    "tflite_fp32_student_1", "tflite_fp16_student_1", "tflite_int8_student_1",
)
#: The peers of the summary line, row -> what it says.
PEERS = {"voxelmorph_1": "VoxelMorph", "ants_syn": "ANTs SyN"}
#: The students the summary line compares with the peers.
PEER_STUDENTS = ("student_crd_1", "student_1")
ANTS_TRANSFORM = "SyN"               # antspyx: affine + deformable SyN, mutual information
#: (numerator, denominator) rows of the printed ratios.
RATIOS = (("teacher_affine_vtn1", "student_1"), ("teacher_affine_vtn3", "student_3"),
          ("teacher_affine_vtn3", "student_1"), ("teacher_affine_vtn3", "student_crd_1"),
          ("student_crd_1", "student_1"), ("student_crd_1", "warp"), ("student_1", "warp"),
          *((peer, student) for peer in PEERS for student in PEER_STUDENTS))
#: Rows too slow to time again in alternation (one call takes many seconds), besides the
#: ``+refine`` rows.
UNPAIRED = ("ants_syn",)
TFLITE_THREADS = 2
_ROW = re.compile(r"^(?:(?P<savedmodel>savedmodel_(?P<portable>portable_)?)|"
                  r"tflite_(?P<tflite>fp32|fp16|int8)_)?"
                  r"(?P<model>" + "|".join(MODELS) + r")(?P<variant>_bf16|_keras_upconv)?"
                  r"(?:\+refine(?P<refine>[1-9][0-9]*))?(?:@b(?P<batch>[1-9][0-9]*))?$")


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    source: str = "in-process"  # "in-process" | "savedmodel" | "savedmodel_portable" | "tflite"
                                #  | "warp" | "ants"
    model: str | None = None
    dtype: str = "float32"
    subpixel: bool = True
    tflite: str | None = None
    batch: int = 1
    refine: int = 0             # test-time refinement steps after the network (in-process)


def parse_row(name: str) -> Row:
    """:class:`Row` of a row name; ``ValueError`` naming the grammar if it is unknown."""
    if name == "warp":
        return Row(name, source="warp")
    if name == "ants_syn":
        return Row(name, source="ants")
    match = _ROW.match(name)
    if not match or (match["tflite"] and (match["variant"] or match["batch"])) \
            or (match["refine"] and (match["savedmodel"] or match["tflite"])):
        raise ValueError(
            f"unknown row {name!r}: expected 'warp', 'ants_syn' or [savedmodel_ | "
            f"savedmodel_portable_ | tflite_<fp32|fp16|int8>_]<model>[_bf16 | _keras_upconv]"
            f"[+refine<steps>][@b<batch>] with <model> one of {', '.join(MODELS)} (TFLite "
            f"rows take no suffix, +refine only in-process)")
    source = "in-process"
    if match["savedmodel"]:
        source = "savedmodel_portable" if match["portable"] else "savedmodel"
    elif match["tflite"]:
        source = "tflite"
    return Row(name, source=source, model=match["model"],
               dtype="bfloat16" if match["variant"] == "_bf16" else "float32",
               subpixel=match["variant"] != "_keras_upconv", tflite=match["tflite"],
               batch=int(match["batch"] or 1), refine=int(match["refine"] or 0))


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


class Skipped(Exception):
    """A row that cannot run here (a missing optional package, no bfloat16): the reason."""


def prepare_ants(size: int) -> "Prepared":
    """ANTs SyN through antspyx (``pip install 'aldk-tf[bench]'``) on the same pair: one
    call of ``ants.registration`` as a user makes it (ITK threads: every core); its
    transform files are removed after each call."""
    try:
        import ants
    except ModuleNotFoundError as error:
        if error.name != "ants":
            raise Skipped(f"antspyx does not import: {error}") from None
        raise Skipped("antspyx not installed (pip install 'aldk-tf[bench]')") from None
    except ImportError as error:
        raise Skipped(f"antspyx does not import: {error}") from None

    def run(fixed, moving):
        result = ants.registration(ants.from_numpy(fixed[0, ..., 0]),
                                   ants.from_numpy(moving[0, ..., 0]),
                                   type_of_transform=ANTS_TRANSFORM, random_seed=0)
        warped = result["warpedmovout"].numpy()
        for path in {*result["fwdtransforms"], *result["invtransforms"]}:
            if os.path.isfile(path):
                os.remove(path)
        return {"warped": warped}
    return Prepared(run, 0, None, ants, {})


@dataclasses.dataclass
class Prepared:
    """A row ready to time: ``run(fixed, moving) -> outputs`` and what to report."""
    run: object
    params: int
    slow: dict | None          # slow ops in the graph (None: not checked)
    keep: object               # keeps the model / interpreter alive while timing
    work: dict                 # FLOP per kind (bench/work.py), or {"bytes": ...} (warp)


def prepare(row: Row, size: int, workdir: str) -> Prepared:
    if row.source == "ants":
        return prepare_ants(size)
    if row.source == "warp":
        image = tf.TensorSpec([1, size, size, size, 1], tf.float32)
        flow_spec = tf.TensorSpec([1, size, size, size, 3], tf.float32)
        warp = tf.function(spatial.warp, input_signature=[image, flow_spec])
        flow = tf.constant(smooth_flow(size))
        return Prepared(lambda fixed, moving: {"warped": warp(moving, flow)}, 0,
                        slow_ops(warp.get_concrete_function()), warp,
                        {"bytes": machine.warp_bytes(size)})
    model = build_model(row, size)
    params = model.parameter_report()["total"]
    if row.source == "tflite":
        flatbuffer = serving.convert_tflite(model, row.tflite)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")         # tf.lite.Interpreter deprecation notice
            interpreter = tf.lite.Interpreter(model_content=flatbuffer,
                                              num_threads=TFLITE_THREADS)
        signature = interpreter.get_signature_runner(serving.SERVING_SIGNATURE)
        # TFLite converts the Keras graph: transposed convolutions as they are.
        return Prepared(lambda fixed, moving: signature(fixed=fixed, moving=moving), params,
                        None, interpreter, count_work(model, subpixel=False))
    register = registration_function(model, batch=row.batch, dtype=row.dtype,
                                     subpixel=row.subpixel)
    work = count_work(register.graph, batch=row.batch, subpixel=row.subpixel)
    if row.source == "in-process" and row.refine:   # work: the refinement is not counted
        return Prepared(_refined(register, row.refine), params,
                        slow_ops(register.get_concrete_function()), register, {})
    if row.source == "in-process":
        return Prepared(register, params, slow_ops(register.get_concrete_function()),
                        register, work)
    path = os.path.join(workdir, row.name)
    serving.save_savedmodel(register.graph, path,
                            portable=row.source == "savedmodel_portable")
    loaded = tf.saved_model.load(path)
    signature = loaded.signatures[serving.SERVING_SIGNATURE]
    return Prepared(lambda fixed, moving: signature(fixed=fixed, moving=moving), params,
                    slow_ops(signature), loaded, work)


def _refined(register, steps: int):
    """``register`` followed by ``steps`` steps of test-time refinement of its flow and
    the warp by the refined flow (what ``register --refine N`` runs on the model's grid)."""
    def run(fixed, moving):
        flow, _ = refine_flow(fixed, moving, register(fixed, moving)["flow"], steps)
        return {"flow": flow, "warped": spatial.warp(moving, flow)}
    return run


def fetching(run, fixed, moving):
    """The zero-argument call a row times: ``run`` and the fetch of its outputs."""
    def call():
        return {key: np.asarray(value) for key, value in run(fixed, moving).items()}
    return call


def measure(call, warmup: int, repeats: int) -> dict:
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


def add_speed(result: dict, work: dict, peaks: dict) -> dict:
    """Work and distance to the machine's limit of one measured row (in place).

    Network rows: ``work_gflop`` (convolutions and dense layers, bench/work.py),
    ``gflops`` (work / median time) and ``peak_fraction`` (``gflops`` over the measured
    peak of the row's dtype). The warp row: ``bytes`` it must move, ``bound_ms`` (bytes
    over the measured "scale" bandwidth) and ``peak_fraction`` (``bound_ms`` / median).
    """
    seconds = result["median_ms"] / 1e3
    if "bytes" in work:
        result["bytes"] = int(work["bytes"])
        bandwidth = peaks.get("memory", {}).get("scale_gbs")
        if bandwidth:
            result["bound_ms"] = 1e3 * work["bytes"] / (bandwidth * 1e9)
            result["peak_fraction"] = result["bound_ms"] / result["median_ms"]
        return result
    if "total" not in work:                                   # ANTs: not counted
        return result
    result["work_gflop"] = work["total"] / 1e9
    result["work_by_kind_gflop"] = {kind: flops / 1e9 for kind, flops in work.items()
                                    if kind != "total" and flops}
    result["gflops"] = result["work_gflop"] / seconds
    peak = peaks.get(result.get("dtype", "float32"), {}).get("gflops")
    if peak:
        result["peak_fraction"] = result["gflops"] / peak
    return result


def run_row(row: Row, size: int, fixed, moving, warmup: int, repeats: int,
            workdir: str, peaks: dict | None = None, ants_repeats: int = 1,
            keep: bool = False) -> tuple[dict, object]:
    """The row's measurement, and (``keep``) its timed call kept ready for
    :func:`paired_ratios` (else None: the model is released)."""
    prepared = prepare(row, size, workdir)
    if row.batch > 1:                    # the same pair, row.batch times
        fixed, moving = (np.repeat(image, row.batch, axis=0) for image in (fixed, moving))
    if row.source not in ("tflite", "ants"):
        fixed, moving = tf.constant(fixed), tf.constant(moving)
    if row.source == "ants":             # nothing to trace or compile; minutes per call
        warmup, repeats = 0, ants_repeats
    call = fetching(prepared.run, fixed, moving)
    result = measure(call, warmup, repeats)
    result.update(params=int(prepared.params), source=row.source, dtype=row.dtype,
                  batch=row.batch, pairs_per_s=row.batch / (result["median_ms"] / 1e3))
    if row.refine:
        result["refine_steps"] = row.refine
    add_speed(result, prepared.work, peaks or {})
    if prepared.slow is not None:
        result["slow_ops"] = prepared.slow
    if keep:
        call.prepared = prepared                    # the model stays alive with the call
        return result, call
    del prepared, call
    keras.backend.clear_session()
    gc.collect()
    return result, None


def paired_ratios(pairs, calls: dict, rounds: int) -> dict[str, dict]:
    """Each ratio again from calls of its two rows in alternation (a b, b a, ...):
    ``{label: {"paired": median over rounds of t_a / t_b (wall), "paired_cpu": the same
    for process CPU time, "rounds": rounds}}``.

    The rows' own medians come from minutes apart; on a shared machine whose speed
    drifts, the ratio of two calls made back to back is the steadier comparison.
    """
    paired = {}
    for a, b in pairs:
        if a not in calls or b not in calls:
            continue
        for name in (a, b):                         # caches warm again after other rows
            calls[name]()
        walls, cpus = [], []
        for index in range(rounds):
            times = {}
            for name in ((a, b) if index % 2 == 0 else (b, a)):
                wall, cpu = repeat_timed(calls[name], 1)
                times[name] = (wall[0], cpu[0])
            walls.append(times[a][0] / times[b][0])
            cpus.append(times[a][1] / times[b][1])
        paired[f"{a} / {b}"] = {"paired": float(np.median(walls)),
                                "paired_cpu": float(np.median(cpus)), "rounds": rounds}
    return paired


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


def measured(results: dict) -> dict:
    """The rows that ran (not ``{"skipped": why}``)."""
    return {name: r for name, r in results.items() if "median_ms" in r}


def ratio_pairs(names) -> list[tuple[str, str]]:
    """The ``(numerator, denominator)`` rows compared among ``names``: :data:`RATIOS`,
    each SavedModel row over its in-process row, each ``_bf16`` / ``_keras_upconv`` /
    ``+refine`` row over the row without it."""
    names = list(names)
    pairs = [(a, b) for a, b in RATIOS if a in names and b in names]
    for name in names:
        for prefix in ("savedmodel_", "savedmodel_portable_"):
            if name.startswith(prefix) and name[len(prefix):] in names:
                pairs.append((name, name[len(prefix):]))
        base = re.sub(r"(_bf16|_keras_upconv|\+refine[0-9]+)(?=$|@)", "", name, count=1)
        if base != name and base in names:
            pairs.append((name, base))
    return pairs


def ratios(results: dict, paired: dict | None = None) -> list[dict]:
    """Per pair of :func:`ratio_pairs`: ``{"label", "wall", "cpu"}`` (ratios of the rows'
    median wall / CPU times) and, where measured, :func:`paired_ratios`' fields."""
    results = measured(results)
    return [{"label": f"{a} / {b}",
             "wall": results[a]["median_ms"] / results[b]["median_ms"],
             "cpu": results[a]["cpu_ms"] / results[b]["cpu_ms"],
             **(paired or {}).get(f"{a} / {b}", {})}
            for a, b in ratio_pairs(results)]


def refinement(results: dict) -> dict[str, dict]:
    """``{row: {"steps", "ms_per_step"}}`` for each ``+refine`` row measured with its
    row without refinement: the added time over the step count (iterations vs time)."""
    table, results = {}, measured(results)
    for name, r in results.items():
        steps = r.get("refine_steps")
        base = re.sub(r"\+refine[0-9]+", "", name, count=1)
        if steps and base in results:
            table[name] = {"steps": steps, "ms_per_step":
                           (r["median_ms"] - results[base]["median_ms"]) / steps}
    return table


def measure_machine(size: str, repeats: int, bf16: bool) -> dict:
    """The machine's limits in this process (bench/machine.py): peak GFLOP/s per dtype
    (``bfloat16`` only when the bf16 rows run) and memory bandwidth; ``{}`` for "off"."""
    if size == "off":
        return {}
    peaks = {"size": size, "float32": machine.peak_gflops("float32", size, repeats)}
    if bf16:
        peaks["bfloat16"] = machine.peak_gflops("bfloat16", size, repeats)
    peaks["memory"] = machine.memory_bandwidth(size, repeats)
    return peaks


def format_machine(peaks: dict) -> str:
    if not peaks:
        return "machine peak: not measured (--peak off): no fraction of peak"
    lines = [f"machine peak, this process ({peaks['size']} micro-benchmarks, median):"]
    for dtype in ("float32", "bfloat16"):
        if dtype in peaks:
            p = peaks[dtype]
            lines.append(f"  {dtype:9s} matmul {p['matmul']['n']}^2: "
                         f"{p['matmul']['gflops']:.1f} GFLOP/s; 1x1x1 conv "
                         f"{p['conv1x1x1']['grid']}^3 x {p['conv1x1x1']['channels']} ch: "
                         f"{p['conv1x1x1']['gflops']:.1f} GFLOP/s; peak {p['gflops']:.1f}")
    memory = peaks["memory"]
    lines.append(f"  memory    scale {memory['scale_gbs']:.1f} GB/s (read + write), sum "
                 f"{memory['sum_gbs']:.1f} GB/s (read), {memory['megabytes']:.0f} MB "
                 f"arrays, {memory['threads']} threads")
    return "\n".join(lines)


def peer_summary(results: dict) -> dict[str, dict[str, float | str]]:
    """``{student: {peer row: how many times faster (median wall), or why not}}``."""
    summary = {}
    for student in PEER_STUDENTS:
        if "median_ms" not in results.get(student, {}):
            continue
        summary[student] = {}
        for peer in PEERS:
            entry = results.get(peer)
            if entry is None:
                summary[student][peer] = "not in this run"
            elif "skipped" in entry:
                summary[student][peer] = f"skipped: {entry['skipped']}"
            else:
                summary[student][peer] = entry["median_ms"] / results[student]["median_ms"]
    return summary


def format_peers(results: dict) -> list[str]:
    lines = []
    for student, peers in peer_summary(results).items():
        parts = [f"{value:.1f}x faster than {PEERS[peer]}" if isinstance(value, float)
                 else f"{PEERS[peer]} {value}" for peer, value in peers.items()]
        lines.append(f"  {student}: " + ", ".join(parts))
    return ["", "peers (same run, median wall time):", *lines] if lines else []


def throughput(results: dict) -> dict[str, dict[int, float]]:
    """``{row without @b: {batch: pairs per second}}`` for rows measured at more than one
    batch size (``student_1`` counts as batch 1 of ``student_1@b4``)."""
    table = {}
    for name, r in measured(results).items():
        table.setdefault(name.split("@b")[0], {})[r.get("batch", 1)] = r["pairs_per_s"]
    return {name: dict(sorted(by_batch.items())) for name, by_batch in table.items()
            if len(by_batch) > 1}


def format_throughput(results: dict) -> list[str]:
    table = throughput(results)
    if not table:
        return []
    batches = sorted({b for by_batch in table.values() for b in by_batch})
    lines = ["", f"{'pairs per second (median)':36s}" + "".join(f"{f'batch {b}':>10s}"
                                                            for b in batches)]
    for name, by_batch in table.items():
        lines.append(f"  {name:34s}" + "".join(
            f"{by_batch[b]:10.2f}" if b in by_batch else f"{'-':>10s}" for b in batches))
    return lines


def format_table(results: dict, paired: dict | None = None) -> str:
    def mb(entry, key):
        return f"{entry[key]:,.0f}" if key in entry else "-"

    def speed(entry):
        if "work_gflop" in entry:
            work, rate = f"{entry['work_gflop']:.2f}", f"{entry['gflops']:.1f}"
        elif "bytes" in entry:
            work, rate = f"{entry['bytes'] / 1e6:.1f} MB", "-"
        else:
            work, rate = "-", "-"
        fraction = f"{100 * entry['peak_fraction']:.1f}" if "peak_fraction" in entry \
            else "-"
        if "bytes" in entry and "peak_fraction" in entry:
            fraction += " bw"
        return f"{work:>9s}{rate:>9s}{fraction:>9s}"
    lines = [f"{'row':36s}{'median ms':>10s}{'min':>8s}{'max':>8s}{'cpu ms':>9s}"
             f"{'params':>12s}{'rss MB':>8s}{'peak MB':>9s}{'+call':>7s}{'load':>6s}"
             f"{'GFLOP':>9s}{'GFLOP/s':>9s}{'% peak':>9s}"]
    for name, r in results.items():
        if "skipped" in r:
            lines.append(f"{name:36s}skipped: {r['skipped']}")
            continue
        lines.append(f"{name:36s}{r['median_ms']:10.1f}{r['min_ms']:8.1f}{r['max_ms']:8.1f}"
                     f"{r['cpu_ms']:9.1f}{r['params']:12,d}{mb(r, 'rss_mb'):>8s}"
                     f"{mb(r, 'peak_mb'):>9s}{mb(r, 'peak_increase_mb'):>7s}"
                     f"{r['load_1min']:6.1f}{speed(r)}")
    lines.append("GFLOP: convolutions and dense layers as the row runs them (2 per "
                 "multiply-add); % peak: GFLOP/s over the row dtype's measured peak; "
                 "warp: 'bw' = bandwidth bound (bytes / scale GB/s) over its time")
    lines.extend(format_throughput(results))
    lines.extend(format_peers(results))
    refined = refinement(results)
    if refined:
        lines.append("")
        lines.append("test-time refinement (added time per step, median rows):")
        lines.extend(f"  {name}: {r['steps']} steps, {r['ms_per_step']:.1f} ms per step"
                     for name, r in refined.items())
    table_ratios = ratios(results, paired)
    if table_ratios:
        lines.append("")
        lines.append(f"{'ratios of medians (paired: median ratio of alternating calls)':60s}"
                     f"{'wall':>7s}{'cpu':>7s}{'paired':>8s}")
        lines.extend(f"  {r['label']:58s}{r['wall']:7.2f}{r['cpu']:7.2f}"
                     + (f"{r['paired']:8.2f}" if "paired" in r else f"{'-':>8s}")
                     for r in table_ratios)
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
    parser.add_argument("--bf16", default=machine.default_bf16_mode(),
                        help="the _bf16 rows and the bf16 peak: 'auto' (default, or "
                             f"${machine.BF16_ENV}) runs them only where /proc/cpuinfo "
                             "lists amx_bf16 or avx512_bf16; 'on' forces them; 'off' skips "
                             "them")
    parser.add_argument("--ants-repeats", "--ants_repeats", type=int, default=1,
                        help="timed calls of the ants_syn row (no warm-up; default 1)")
    parser.add_argument("--paired-rounds", "--paired_rounds", type=int, default=7,
                        help="after the rows, each ratio again from this many rounds of "
                             "alternating calls of its two rows (0: off; default 7)")
    parser.add_argument("--peak", choices=("full", "quick", "off"), default="full",
                        help="machine micro-benchmarks before the rows (peak GFLOP/s, "
                             "memory bandwidth): 'quick' only checks they run (default "
                             "full)")
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
    if args.repeats < 1 or args.warmup < 1 or args.ants_repeats < 1:
        print("error: --repeats, --warmup and --ants-repeats must be >= 1", file=sys.stderr)
        return 2
    if args.paired_rounds < 0:
        print(f"error: --paired-rounds: expected an integer >= 0, got {args.paired_rounds}",
              file=sys.stderr)
        return 2
    try:
        bf16, bf16_reason = machine.bf16_decision(args.bf16)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
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
    print(f"bfloat16 rows: {'run' if bf16 else 'skipped'} ({bf16_reason})")
    peaks = measure_machine(args.peak, args.repeats, bf16=bf16)
    print(format_machine(peaks), flush=True)
    fixed, moving = sample_pair(args.size)
    results, calls, paired = {}, {}, {}
    paired_rows = {name for pair in ratio_pairs(row.name for row in rows)
                   if not any(name in UNPAIRED or "+refine" in name for name in pair)
                   for name in pair} if args.paired_rounds else set()
    with tempfile.TemporaryDirectory(prefix="bench-inference-") as workdir:
        for row in rows:
            if row.dtype == "bfloat16" and not bf16:
                results[row.name] = {"skipped": f"no bfloat16: {bf16_reason}"}
                continue
            started = time.perf_counter()
            try:
                results[row.name], call = run_row(
                    row, args.size, fixed, moving, args.warmup, args.repeats, workdir,
                    peaks, args.ants_repeats, keep=row.name in paired_rows)
            except Skipped as reason:
                results[row.name] = {"skipped": str(reason)}
                print(f"  {row.name}: skipped: {reason}", file=sys.stderr, flush=True)
                continue
            except (ValueError, serving.ExportError) as error:
                print(f"{row.name}: failed: {error}", file=sys.stderr, flush=True)
                continue
            if call is not None:
                calls[row.name] = call
            r = results[row.name]
            print(f"  {row.name}: {r['median_ms']:.1f} ms (row took "
                  f"{time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
        if calls:
            started = time.perf_counter()
            paired = paired_ratios(ratio_pairs(calls), calls, args.paired_rounds)
            print(f"  paired ratios: {len(paired)} pairs x {args.paired_rounds} rounds "
                  f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
        calls.clear()
    print()
    print(format_table(results, paired))
    print(f"\nload average at end {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if args.json:
        peaks = {**peaks, "bf16": {"run": bf16, "reason": bf16_reason,
                                   "cpu_flags": machine.bf16_features()}}
        atomic_write_text(args.json, json.dumps(
            {"machine": peaks, "rows": results, "peers": peer_summary(results),
             "ratios": {r.pop("label"): r for r in ratios(results, paired)},
             "refinement": refinement(results)}, indent=2) + "\n")
    return 0 if len(results) == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
