"""benchmarks.host: the CPU a figure names, parsed from /proc/cpuinfo texts of the machines seen here."""

from benchmarks.host import CpuInfo, parse_cpuinfo

# Two processors of an AVX2-only AMD EPYC VM (abridged): the generic model name alone would not
# tell Zen 1 (family 23) from Zen 3 or Zen 4 (family 25).
ZEN1 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 23
model\t\t: 1
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx fma avx2 bmi2

processor\t: 1
vendor_id\t: AuthenticAMD
cpu family\t: 23
model\t\t: 1
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx fma avx2 bmi2
"""


def test_parse_names_family_and_model():
    cpu = parse_cpuinfo(ZEN1)
    assert cpu == CpuInfo("AMD EPYC", "23", "1", frozenset({"fpu", "sse2", "avx", "fma", "avx2", "bmi2"}))
    assert cpu.name == "AMD EPYC, family 23 model 1"


def test_first_processor_only():
    # A model-name line of a later processor never overrides the first one's.
    cpu = parse_cpuinfo(ZEN1.replace("model name\t: AMD EPYC\nflags\t\t: fpu sse2 avx fma avx2 bmi2\n\n",
                                      "model name\t: AMD EPYC 7551\nflags\t\t: avx512f\n\n", 1))
    assert cpu.model_name == "AMD EPYC 7551" and cpu.flags == {"avx512f"}


def test_without_family_the_model_name_alone():
    # e.g. ARM's /proc/cpuinfo has neither line; the name falls back to what platform reports.
    cpu = parse_cpuinfo("processor\t: 0\nFeatures\t: fp asimd\n")
    assert cpu.family is None and cpu.name == cpu.model_name and cpu.name
