"""Hardware profiles: datasheet peaks and how to recognise a device (hardware_profiles/*.yaml).
Detection matches NVML/torch GPU names, else the CPU model, against each profile's patterns.
Datasheet peaks are leads: harness.perf.probes measures the achievable ceilings on the spot."""

from __future__ import annotations

import re
from functools import lru_cache
from importlib import resources

import yaml
from pydantic import BaseModel, ConfigDict, Field

from harness.errors import HarnessError
from harness.results.provenance import cpu_name, gpu_info


class HardwareProfile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    kind: str = Field(pattern="^(gpu|cpu)$")
    vendor: str = ""
    match: list[str] = Field(default_factory=list, description="regexes matched against the device name")
    memory_bytes: float | None = None
    memory_bandwidth_bytes_s: float | None = None
    peak_flops: dict[str, float] = Field(default_factory=dict, description="dtype -> dense FLOP/s (OP/s for ints)")
    tdp_w: float | None = None
    source: str = ""


@lru_cache(maxsize=1)
def profiles() -> dict[str, HardwareProfile]:
    from pydantic import ValidationError

    out = {}
    for entry in sorted(resources.files("harness.hardware_profiles").iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".yaml"):
            try:
                profile = HardwareProfile.model_validate(yaml.safe_load(entry.read_text()))
            except (yaml.YAMLError, ValidationError) as exc:
                raise HarnessError(f"hardware profile {entry.name}: {str(exc).splitlines()[0]}") from None
            out[profile.name] = profile
    return out


def match_profile(device_name: str, kind: str) -> HardwareProfile | None:
    """The profile whose pattern matches the device name; the longest matching text wins when
    several do (so 'A100 80GB PCIe' is not taken by a shorter generic pattern)."""
    best, best_len = None, -1
    for profile in profiles().values():
        if profile.kind != kind:
            continue
        for pattern in profile.match:
            m = re.search(pattern, device_name, re.IGNORECASE)
            if m and len(m.group(0)) > best_len:
                best, best_len = profile, len(m.group(0))
    return best


def current_profile(device: str = "cpu") -> tuple[str, HardwareProfile | None]:
    """(profile name, profile or None) for the device a cell runs on."""
    name, _ = detect(device)
    return name, profiles().get(name)


def describe(profile: HardwareProfile | None) -> str:
    """One line of datasheet numbers for `harness env`, or why there are none."""
    if profile is None:
        return "no datasheet profile matches this device: speed is placed against measured ceilings only"
    parts = []
    if profile.memory_bandwidth_bytes_s:
        parts.append(f"{profile.memory_bandwidth_bytes_s / 1e12:.3g} TB/s")
    parts += [f"{k} {v / 1e12:.4g} T{'OP' if k.startswith('int') else 'FLOP'}/s" for k, v in profile.peak_flops.items()]
    if profile.memory_bytes:
        parts.append(f"{profile.memory_bytes / 2**30:.0f} GiB")
    if profile.tdp_w:
        parts.append(f"TDP {profile.tdp_w:g} W")
    if not parts:
        return f"no datasheet peaks in profile {profile.name} ({profile.source}): measured ceilings only"
    return f"datasheet ({profile.source or 'no source'}): " + ", ".join(parts)


def detect(device: str) -> tuple[str, str]:
    """(profile name, device name) for 'cpu' or 'cuda'; profile 'unknown-<kind>' when none fits."""
    if device.startswith("cuda"):
        gpus = gpu_info().get("gpus") or ["unknown GPU"]
        name, kind = gpus[0], "gpu"
    else:
        name, kind = cpu_name(), "cpu"
    profile = match_profile(name, kind)
    fallback = "generic-x86-cpu" if kind == "cpu" and "generic-x86-cpu" in profiles() else f"unknown-{kind}"
    return (profile.name if profile else fallback), name
