"""The machine line of the generated results pages (mextract.timings)."""

from pathlib import Path

from mextract.timings import machine_description

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse sse2 avx512f avx512_bf16 amx_bf16 amx_tile

processor\t: 1
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse sse2 avx512f avx512_bf16 amx_bf16 amx_tile
"""


def test_machine_names_the_cpu_its_cores_and_bf16(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(CPUINFO)
    line = machine_description(info)
    assert line.startswith("Intel(R) Xeon(R) Processor, ")
    assert " cores" in line
    assert "bf16 instructions: amx_bf16, avx512_bf16" in line
    assert "torch " in line  # the test environment has torch


def test_a_cpu_without_bf16_says_so(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(CPUINFO.replace(" avx512_bf16 amx_bf16", ""))
    assert "bf16 instructions: none" in machine_description(info)


def test_no_cpuinfo_still_describes_the_machine(tmp_path: Path) -> None:
    line = machine_description(tmp_path / "missing")
    assert " cores; bf16 instructions: none" in line
