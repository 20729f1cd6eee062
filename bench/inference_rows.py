"""The rows of ``bench/inference.py``: their names, and each built and ready to time.

A row name says which model, how it is deployed and with what (the grammar:
``bench/inference.py``'s docstring); :func:`prepare` builds it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import warnings

import keras
import numpy as np
import tensorflow as tf

from aldk_tf import spatial
from aldk_tf.deploy import export, serving
from aldk_tf.deploy.inference import registration_function, slow_ops
from aldk_tf.networks import build_student, build_teacher
from aldk_tf.training.refine import refine_flow

try:                                 # python -m bench.<script>; imported from the root (tests)
    from bench import machine
    from bench.work import count_memory_bytes, count_work
except ModuleNotFoundError:          # python bench/<script>.py: sys.path[0] is bench/
    import machine
    from work import count_memory_bytes, count_work

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
                        {"bytes": machine.warp_bytes(size), "size": size})
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
                        None, interpreter, {**count_work(model, subpixel=False),
                                            "memory_bytes": count_memory_bytes(model)})
    register = registration_function(model, batch=row.batch, dtype=row.dtype,
                                     subpixel=row.subpixel)
    work = {**count_work(register.graph, batch=row.batch, subpixel=row.subpixel),
            "memory_bytes": count_memory_bytes(register.graph, row.batch)}
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
