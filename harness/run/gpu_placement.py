"""Spread one model over the GPUs a cell was given (`gpus: N` in a suite), for a model that does not
fit one GPU (e.g. a 70B-shape model in fp16 over the GPUs of one node). accelerate's own device map
(infer_auto_device_map + dispatch_model) places whole decoder layers per GPU and moves activations
between them; nothing is re-implemented here. The adapter quantizes on the CPU first, so this
suits backends whose result is plain torch modules (fp, rtn); not run on GPUs yet (docs/RAY.md)."""

from __future__ import annotations

from collections import Counter

from harness.errors import HarnessError

HEADROOM = 0.85  # of each GPU's free memory for weights: activations and the CUDA context need the rest


def spread_over_gpus(qmodel, n_gpus: int) -> dict:
    """Dispatch `qmodel.module` over cuda:0..n_gpus-1 (balanced); returns a provenance summary."""
    import torch
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    visible = torch.cuda.device_count()
    if visible < n_gpus:
        raise HarnessError(f"the cell needs {n_gpus} GPUs but its process sees {visible}")
    module = qmodel.module
    no_split = list(getattr(module, "_no_split_modules", None) or [])
    free = {i: int(torch.cuda.mem_get_info(i)[0] * HEADROOM) for i in range(n_gpus)}
    max_memory = get_balanced_memory(module, max_memory=free, no_split_module_classes=no_split)
    device_map = infer_auto_device_map(module, max_memory=max_memory, no_split_module_classes=no_split)
    off_gpu = sorted({str(d) for d in device_map.values() if not isinstance(d, int) and not str(d).startswith("cuda")})
    if off_gpu:
        raise HarnessError(f"the model does not fit on {n_gpus} GPUs (accelerate would put parts on {', '.join(off_gpu)})")
    dispatch_model(module, device_map=device_map)
    qmodel.device = torch.device("cuda:0")  # inputs start on the first GPU; accelerate's hooks move them on
    per_gpu = Counter(f"cuda:{d}" if isinstance(d, int) else str(d) for d in device_map.values())
    return {"gpus": n_gpus, "modules_per_gpu": dict(sorted(per_gpu.items())),
            "max_memory_bytes": {f"cuda:{i}": int(m) for i, m in max_memory.items() if isinstance(i, int)}}
