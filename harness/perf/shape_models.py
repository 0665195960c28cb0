"""`shape:NAME` models: random-init models of real shapes, for speed only.

Speed needs no trained weights: the configs of Llama-2-7B, Llama-3-8B, Mistral-7B and
Qwen2.5-7B are written out as small JSON files in harness/perf/shapes/, and the model is built
from the config with random weights (seeded). No tokenizer: perf measurements draw random token
ids. The planner refuses quality measurements on these models (their numbers would be noise)."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from harness.errors import HarnessError

PREFIX = "shape:"


def shape_names() -> list[str]:
    folder = resources.files("harness.perf") / "shapes"
    return sorted(PREFIX + p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


def resolve_shape(name: str, prepare: bool = True):
    # lazy: a cycle at module level (harness.models.zoo imports this module)
    from harness.models.zoo import ModelSource, cache_root

    if name not in shape_names():
        from harness.errors import unknown

        raise unknown("model shape", name, shape_names())
    stem = name[len(PREFIX):]
    config = json.loads((resources.files("harness.perf") / "shapes" / f"{stem}.json").read_text())
    dest = cache_root() / "shapes" / stem
    if prepare:
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "config.json").write_text(json.dumps({k: v for k, v in config.items() if not k.startswith("_")}, indent=1))
    return ModelSource(name=name, path=str(dest), kind="shape",
                       note=f"random-init weights of a real shape ({config.get('_qharness_source', stem)}): speed only, no quality claim",
                       meta={"random_init": True})


def load_shape(source, dtype=None):
    """(random-init model, None): built from the config with a fixed seed, eval mode, in the
    shape's dtype unless `dtype` says otherwise (adapters then cast or quantize as usual)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(source.path) / "config.json"
    if not path.exists():
        raise HarnessError(f"model '{source.name}': {path} is missing (resolve it with prepare=True first)")
    config = AutoConfig.from_pretrained(source.path)
    if dtype is None:  # the shape's own dtype (fp16 for the shipped 7B shapes), as deployed
        raw = json.loads(path.read_text())
        dtype = getattr(torch, str(raw.get("dtype") or raw.get("torch_dtype") or "float32"))
    from accelerate import init_empty_weights

    # Parameters on the meta device, then filled in place: transformers' own init of a 7B model on
    # CPU (normal_ per layer) outlasted a 240 s cell timeout on the lent GPU machine; uniform fills
    # run ~4x faster. Buffers (rotary inv_freq) are built for real, as usual.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    _fill_random(model, seed=0)
    model.eval()
    model.qharness_source = source
    return model, None


def _fill_random(model, seed: int, std: float = 0.02) -> None:
    """Matrices ~ U(-a, a) with the std transformers uses (0.02); 1-D weights (norms) = 1,
    biases = 0; then re-tie tied weights. Never zeros: they can run faster than real data."""
    import torch

    device = torch.get_default_device()  # cuda under `with torch.device("cuda")`: filled there, ~10x faster
    gen = torch.Generator(device=device).manual_seed(seed)
    bound = std * 3**0.5
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            data = torch.empty(param.shape, dtype=param.dtype, device=device)
            if param.ndim >= 2:
                data.uniform_(-bound, bound, generator=gen)
            else:
                data.fill_(0.0 if name == "bias" else 1.0)
            module._parameters[name] = torch.nn.Parameter(data, requires_grad=False)
    model.tie_weights()
