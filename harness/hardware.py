"""Hardware profiles: datasheet peaks and how to recognise a device (hardware_profiles/*.yaml).
Detection matches NVML/torch GPU names, else the CPU model, against each profile's patterns."""

from __future__ import annotations

import re
from functools import lru_cache
from importlib import resources

import yaml
from pydantic import BaseModel, ConfigDict, Field


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
    out = {}
    for entry in resources.files("harness.hardware_profiles").iterdir():
        if entry.name.endswith(".yaml"):
            profile = HardwareProfile.model_validate(yaml.safe_load(entry.read_text()))
            out[profile.name] = profile
    return out


def match_profile(device_name: str, kind: str) -> HardwareProfile | None:
    for profile in profiles().values():
        if profile.kind == kind and any(re.search(p, device_name, re.IGNORECASE) for p in profile.match):
            return profile
    return None


def detect(device: str) -> tuple[str, str]:
    """(profile name, device name) for 'cpu' or 'cuda'; profile 'unknown-<kind>' when none fits."""
    from harness.provenance import cpu_name, gpu_info

    if device.startswith("cuda"):
        gpus = gpu_info().get("gpus") or ["unknown GPU"]
        name, kind = gpus[0], "gpu"
    else:
        name, kind = cpu_name(), "cpu"
    profile = match_profile(name, kind)
    fallback = "generic-x86-cpu" if kind == "cpu" and "generic-x86-cpu" in profiles() else f"unknown-{kind}"
    return (profile.name if profile else fallback), name
