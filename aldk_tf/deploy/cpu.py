"""What this CPU offers the inference graph: native bfloat16 or not (``/proc/cpuinfo``).

``export.py --dtype bfloat16`` and ``bench/inference.py --bf16 auto`` ask
:func:`bf16_features`; without a native instruction set oneDNN emulates bfloat16 and
``dtype="bfloat16"`` is slower than float32.
"""

from __future__ import annotations

#: ``/proc/cpuinfo`` flags that give oneDNN native bfloat16 arithmetic, best first
#: (``amx_bf16``: Intel AMX tiles, Sapphire Rapids and later; ``avx512_bf16``: AVX-512
#: BF16 dot products, e.g. AMD Zen 4, Intel Cooper Lake). Without them oneDNN emulates
#: bfloat16 and ``dtype="bfloat16"`` is slower than float32.
BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The ``flags`` of the first processor in ``cpuinfo`` (default: ``/proc/cpuinfo``;
    empty when it cannot be read)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as handle:
                cpuinfo = handle.read()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def bf16_features(cpuinfo: str | None = None) -> list[str]:
    """The :data:`BF16_FLAGS` this CPU has, best first (``[]``: no native bfloat16)."""
    flags = cpu_flags(cpuinfo)
    return [flag for flag in BF16_FLAGS if flag in flags]


def training_precision(flag: str, cpuinfo: str | None = None) -> str:
    """``--precision``: auto is bfloat16 where the CPU has native bfloat16 arithmetic
    (AMX or AVX512-BF16; at 1200 steps validation Dice 0.531 against float32's 0.533,
    docs/training.md), else float32."""
    if flag != "auto":
        return flag
    return "bfloat16" if bf16_features(cpuinfo) else "float32"
