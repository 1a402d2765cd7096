"""The CPU a measurement ran on, from Linux's /proc/cpuinfo, for every figure to name.

Cloud VMs often report a bare "AMD EPYC" or "Intel(R) Xeon(R) Processor" as the model name for
CPUs generations apart (seen here: AMD family 23 = Zen 1, family 25 model 1 = Zen 3, model 17 =
Zen 4), so the family and model numbers are part of the name.
"""

from __future__ import annotations

import dataclasses
import functools
import platform


@dataclasses.dataclass(frozen=True)
class CpuInfo:
    model_name: str
    family: str | None = None
    model: str | None = None
    flags: frozenset[str] = frozenset()

    @property
    def name(self) -> str:
        """The model name with its family and model numbers, e.g. "AMD EPYC, family 23 model 1"."""
        if self.family is None or self.model is None:
            return self.model_name
        return f"{self.model_name}, family {self.family} model {self.model}"


def parse_cpuinfo(text: str) -> CpuInfo:
    """The first processor's entry of a /proc/cpuinfo text (all cores of a VM are alike)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break  # end of the first processor's entry
            continue
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return CpuInfo(model_name=fields.get("model name") or platform.processor() or platform.machine(),
                   family=fields.get("cpu family"), model=fields.get("model"),
                   flags=frozenset(fields.get("flags", "").split()))


@functools.lru_cache
def cpu_info() -> CpuInfo:
    """This machine's CPU; without /proc/cpuinfo (not Linux), what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as handle:
            return parse_cpuinfo(handle.read())
    except OSError:
        return parse_cpuinfo("")
