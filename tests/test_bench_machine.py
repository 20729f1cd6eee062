"""bench/machine.py: bfloat16 detection from /proc/cpuinfo text (no timing), and the
benchmark's skipped bf16 rows."""

import json

import pytest

from scripts import load_script

machine = load_script("bench/machine.py")

CPUINFO = """processor\t: 0
vendor_id\t: {vendor}
model name\t: {model}
flags\t\t: fpu vme sse sse2 avx avx2 fma avx512f avx512bw {extra}
bogomips\t: 4000.00

processor\t: 1
flags\t\t: fpu
"""
SAPPHIRE_RAPIDS = CPUINFO.format(vendor="GenuineIntel", model="Intel Xeon Platinum 8480",
                                 extra="avx512_bf16 amx_bf16 amx_tile amx_int8")
ZEN4 = CPUINFO.format(vendor="AuthenticAMD", model="AMD EPYC 9R14", extra="avx512_bf16")
SKYLAKE = CPUINFO.format(vendor="GenuineIntel", model="Intel Xeon Gold 6148", extra="")


def test_bf16_features_from_cpuinfo_text():
    assert machine.bf16_features(SAPPHIRE_RAPIDS) == ["amx_bf16", "avx512_bf16"]
    assert machine.bf16_features(ZEN4) == ["avx512_bf16"]
    assert machine.bf16_features(SKYLAKE) == []
    assert machine.bf16_features("") == []
    assert "avx512f" in machine.cpu_flags(SKYLAKE)         # the first processor's flags


@pytest.mark.parametrize("cpuinfo, auto", [(SAPPHIRE_RAPIDS, True), (ZEN4, True),
                                           (SKYLAKE, False)])
def test_bf16_decision(cpuinfo, auto):
    run, reason = machine.bf16_decision("auto", cpuinfo)
    assert run is auto
    assert ("neither amx_bf16 nor avx512_bf16" in reason) is not auto
    assert machine.bf16_decision("on", cpuinfo)[0] is True
    assert machine.bf16_decision("off", cpuinfo)[0] is False
    with pytest.raises(ValueError, match="--bf16: expected one of auto, on, off"):
        machine.bf16_decision("yes", cpuinfo)


def test_bf16_mode_from_the_environment(monkeypatch):
    monkeypatch.delenv(machine.BF16_ENV, raising=False)
    assert machine.default_bf16_mode() == "auto"
    monkeypatch.setenv(machine.BF16_ENV, "OFF")
    assert machine.default_bf16_mode() == "off"


def test_benchmark_skips_bf16_rows_and_says_why(tmp_path, capsys):
    bench = load_script("bench/inference.py")
    out = tmp_path / "out.json"
    assert bench.main(["--bf16", "off", "--peak", "off", "--rows", "student_1_bf16",
                       "--json", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["rows"]["student_1_bf16"]["skipped"].startswith("no bfloat16: --bf16 off")
    assert written["machine"]["bf16"]["run"] is False
    assert "student_1_bf16" in capsys.readouterr().out
    assert bench.main(["--bf16", "maybe", "--rows", "warp"]) == 2


def test_gather_floor_is_the_faster_form_and_counts_eight_values_per_voxel():
    floor = machine.gather_floor(16, repeats=1)
    assert floor["values"] == 8 * 16 ** 3
    assert floor["floor_ms"] == min(floor["plain_ms"], floor["xla_ms"]) > 0
    assert floor["ns_per_value"] == pytest.approx(1e6 * floor["floor_ms"] / floor["values"])
