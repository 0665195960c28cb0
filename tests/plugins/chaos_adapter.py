"""A deliberately misbehaving adapter for isolation tests. Loaded by import path
('chaos_adapter:ChaosAdapter') with this folder on PYTHONPATH: the plugin mechanism users have."""

from __future__ import annotations

import ctypes
import os
import time
from typing import Literal

from harness.adapters.base import Adapter, QuantizedModel, VariantConfig


class ChaosVariant(VariantConfig):
    mode: Literal["ok", "segfault", "exit", "hang", "raise", "oom", "slow"] = "ok"
    when: Literal["quantize", "measure"] = "quantize"
    seconds: float = 0.0

    def label(self) -> str:
        return f"{self.mode}@{self.when}"


def misbehave(mode: str, seconds: float) -> None:
    if mode == "segfault":
        ctypes.string_at(0)
    elif mode == "exit":
        os._exit(7)
    elif mode == "hang":
        while True:
            time.sleep(1)
    elif mode == "raise":
        raise RuntimeError("chaos adapter raised on purpose")
    elif mode == "oom":
        raise MemoryError("chaos adapter: simulated out of memory")
    elif mode == "slow":
        time.sleep(seconds)


class _ChaosModel(QuantizedModel):
    def logits(self, input_ids):
        misbehave(self.info["mode"], self.info["seconds"])
        return super().logits(input_ids)


class ChaosAdapter(Adapter):
    name = "chaos"
    description = "test adapter that crashes, exits, hangs or raises on purpose"
    Variant = ChaosVariant

    def quantize(self, model, variant, calibration, device):
        counter = os.environ.get("CHAOS_COUNTER")
        if counter:
            with open(counter, "a") as f:
                f.write(f"{variant.label()}\n")
        if variant.when == "quantize":
            misbehave(variant.mode, variant.seconds)
            mode = "ok"
        else:
            mode = variant.mode
        return _ChaosModel(model.to(device), device, info={"mode": mode, "seconds": variant.seconds})
