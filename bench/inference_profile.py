"""Where an inference row's time goes: ``python bench/inference_profile.py --size 128``.

Each row of :mod:`bench.inference` (``--rows``, its names) is built as that benchmark
builds it, warmed up, then ``--calls`` calls are traced with TensorFlow's profiler; the
self time per op type (host threads summed, :func:`bench.train_step.op_self_times`) is
printed per call and written to ``--json``. The step stats behind the per-row reasons of
``docs/benchmarks.md`` ("Distance to the limit per row").
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(HERE) not in sys.path:
    sys.path.insert(0, os.path.dirname(HERE))

import tensorflow as tf  # noqa: E402

from aldk_tf.config import atomic_write_text  # noqa: E402
from bench.inference_rows import parse_row, prepare, sample_pair  # noqa: E402
from bench.train_step import op_self_times  # noqa: E402


def profile(name: str, size: int, calls: int, top: int) -> dict:
    row = parse_row(name)
    fixed, moving = (tf.constant(image) for image in sample_pair(size))
    with tempfile.TemporaryDirectory() as workdir:
        prepared = prepare(row, size, workdir)

        def call():
            outputs = prepared.run(fixed, moving)
            for value in outputs.values():
                getattr(value, "numpy", lambda: value)()

        call()
        call()
        with tempfile.TemporaryDirectory() as folder:
            tf.profiler.experimental.start(folder)
            for _ in range(calls):
                call()
            tf.profiler.experimental.stop()
            from tensorflow.tsl.profiler.protobuf import xplane_pb2
            space = xplane_pb2.XSpace()
            path = glob.glob(os.path.join(folder, "**", "*.xplane.pb"), recursive=True)[0]
            with open(path, "rb") as handle:
                space.ParseFromString(handle.read())
    totals = op_self_times(space)
    ranked = sorted(totals.items(), key=lambda item: -item[1])[:top]
    return {"row": name, "size": size, "calls": calls,
            "ms_per_call_by_op": {kind: ms / calls for kind, ms in ranked},
            "traced_ms_per_call": sum(totals.values()) / calls}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--rows", default="student_1_bf16,student_crd_1,teacher_affine_vtn3")
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--json", default=os.path.join(HERE, "results",
                                                       "inference-profile-128.json"))
    args = parser.parse_args(argv)
    results = []
    for name in [n.strip() for n in args.rows.split(",") if n.strip()]:
        result = profile(name, args.size, args.calls, args.top)
        results.append(result)
        print(f"{name} ({args.size}^3): ops' self time per call, all threads "
              f"({result['traced_ms_per_call']:.1f} ms in all)")
        for kind, ms in result["ms_per_call_by_op"].items():
            print(f"  {ms:8.2f} ms  {kind}")
    atomic_write_text(args.json, json.dumps({"command": "python bench/inference_profile.py "
                                             + " ".join(sys.argv[1:] if argv is None
                                                        else argv),
                                             "rows": results}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
