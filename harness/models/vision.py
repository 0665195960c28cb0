"""Image classifiers: the third model kind (task "vision"), next to causal LMs and sentence encoders.

`builtin:digits-cnn` is a small CNN in the shape of PyTorch's eager static-quantization tutorial
(QuantStub, three conv+bn+relu blocks, DeQuantStub) that the harness trains itself on
scikit-learn's `load_digits`: 1,797 8x8 grey images of handwritten digits (0-16 per pixel) that
ship inside scikit-learn, so the whole kind works offline. Not random weights: its held-out
accuracy is what a trained model gets on digits (~98%; tests/models/test_vision.py holds it >= 95%).

- **Split** (fixed, seeded, by content like the text corpora): each image goes by
  sha1(f"{seed}:" + its 64 pixel bytes) % 20 to test (0-5, ~30%), calibration (6-8, ~15%) or
  train (9-19, ~55%). Identical images land in the same split. Training reads only train; static
  quantizers calibrate only on calibration; measurements score only test.
- **Training**: AdamW, one thread (so the weights do not depend on the machine's core count),
  seeded init and shuffling; ~4 s on one core. The recipe (`RECIPE`) is hashed into the cache
  folder's name (~/.cache/qharness/models/digits-cnn-<hash>/: model.safetensors + config.json
  with the recipe, split sizes and the float accuracies): change the recipe, get a new model.
- Images reach every model as float32 (N, 1, 8, 8) in [0, 1] (pixel / 16).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from harness.models.zoo import ModelSource, cache_root

TASK = "vision"
NAME = "builtin:digits-cnn"
SPLITS = ("train", "calibration", "test")
# every knob that changes the trained weights; hashed into the cache folder name
RECIPE: dict[str, Any] = {
    "format": 1,
    "dataset": "sklearn.datasets.load_digits (1797 images, 8x8, 16 grey levels, 10 classes)",
    "scale": "pixel / 16 -> [0, 1]",
    "split": {"seed": 0, "rule": "sha1(f'{seed}:' + pixel bytes) % 20: 0-5 test, 6-8 calibration, 9-19 train"},
    "arch": {"channels": [16, 32, 64], "kernel": 3, "classes": 10},
    "train": {"epochs": 25, "batch_size": 32, "optimizer": "AdamW", "lr": 0.003, "weight_decay": 0.0001,
              "schedule": "cosine to 0", "seed": 0, "threads": 1},
}
# the conv+bn+relu groups torch.ao.quantization.fuse_modules takes (the tutorial's fusion)
FUSE_GROUPS = [["conv1", "bn1", "relu1"], ["conv2", "bn2", "relu2"], ["conv3", "bn3", "relu3"]]


def _torch_nn():
    import torch
    from torch import nn

    return torch, nn


def build_model(arch: dict[str, Any] | None = None):
    """The CNN (float, random init): QuantStub -> [conv+bn+relu] x2 -> maxpool -> conv+bn+relu ->
    global average pool -> Linear -> DeQuantStub. The stubs are identities until
    torch.ao.quantization.prepare/convert turn them into (de)quantize ops."""
    torch, nn = _torch_nn()
    from torch.ao.quantization import DeQuantStub, QuantStub

    arch = arch or RECIPE["arch"]
    c1, c2, c3 = arch["channels"]
    k = arch["kernel"]

    class DigitsCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.quant = QuantStub()
            self.conv1, self.bn1, self.relu1 = nn.Conv2d(1, c1, k, padding=k // 2), nn.BatchNorm2d(c1), nn.ReLU()
            self.conv2, self.bn2, self.relu2 = nn.Conv2d(c1, c2, k, padding=k // 2), nn.BatchNorm2d(c2), nn.ReLU()
            self.pool = nn.MaxPool2d(2)
            self.conv3, self.bn3, self.relu3 = nn.Conv2d(c2, c3, k, padding=k // 2), nn.BatchNorm2d(c3), nn.ReLU()
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(c3, arch["classes"])
            self.dequant = DeQuantStub()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.quant(x)
            x = self.relu1(self.bn1(self.conv1(x)))
            x = self.relu2(self.bn2(self.conv2(x)))
            x = self.pool(x)
            x = self.relu3(self.bn3(self.conv3(x)))
            x = torch.flatten(self.avgpool(x), 1)
            return self.dequant(self.fc(x))

    return DigitsCNN()


# --- data ---------------------------------------------------------------------------------------

def split_of(pixels: bytes, seed: int) -> str:
    bucket = int(hashlib.sha1(f"{seed}:".encode() + pixels).hexdigest(), 16) % 20
    return "test" if bucket < 6 else "calibration" if bucket < 9 else "train"


@functools.lru_cache(maxsize=4)
def _digits_split(seed: int) -> dict[str, tuple[Any, Any]]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise HarnessError("builtin:digits-cnn needs scikit-learn (its load_digits data ships inside it): "
                           "pip install 'qharness[vision]'") from None
    import numpy as np
    import torch

    digits = load_digits()
    raw = digits.images.astype(np.uint8)  # 0..16
    names = [split_of(img.tobytes(), seed) for img in raw]
    out = {}
    for split in SPLITS:
        idx = np.array([i for i, s in enumerate(names) if s == split])
        images = torch.from_numpy(raw[idx].astype(np.float32) / 16.0).unsqueeze(1)
        out[split] = (images.contiguous(), torch.from_numpy(digits.target[idx].astype(np.int64)))
    return out


def dataset(split: str, seed: int | None = None):
    """(images float32 (N, 1, 8, 8) in [0, 1], labels int64 (N,)) of one split of the digits;
    file order, deterministic. Returned tensors are shared: do not modify them in place."""
    if split not in SPLITS:
        raise HarnessError(f"unknown digits split '{split}' (choose from: {', '.join(SPLITS)})")
    return _digits_split(RECIPE["split"]["seed"] if seed is None else seed)[split]


def dataset_of(model_or_source: Any, split: str):
    """The split of the data a vision model was trained on (read from its source's recipe)."""
    source = getattr(model_or_source, "qharness_source", model_or_source)
    recipe = getattr(source, "meta", {}).get("recipe") or RECIPE
    return dataset(split, recipe["split"]["seed"])


def calibration_images(model: Any, n: int | None):
    """The first n images of the model's calibration split (all of it when n is None)."""
    images, _ = dataset_of(model, "calibration")
    if n is not None and n > images.shape[0]:
        raise HarnessError(f"calibration_images {n}: the calibration split has only {images.shape[0]} images")
    return images if n is None else images[:n]


def example_input(batch: int = 1):
    """A real input that exporters trace shapes with: the first train images (export only reads
    shapes; the test split is kept for scoring)."""
    return dataset("train")[0][:batch].clone()


# --- training and the cache --------------------------------------------------------------------

def recipe_hash(recipe: dict[str, Any] = RECIPE) -> str:
    return hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def accuracy(model, images, labels, batch: int = 512) -> float:
    import torch

    with torch.no_grad():
        preds = torch.cat([model(images[i:i + batch]).argmax(-1) for i in range(0, images.shape[0], batch)])
    return float((preds == labels).float().mean())


def train(recipe: dict[str, Any] = RECIPE):
    """(trained float model in eval mode, info) following `recipe`, deterministically."""
    import torch

    cfg = recipe["train"]
    images, labels = dataset("train", recipe["split"]["seed"])
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg["threads"])
    try:
        torch.manual_seed(cfg["seed"])
        model = build_model(recipe["arch"])
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
        steps_per_epoch = -(-images.shape[0] // cfg["batch_size"])
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg["epochs"] * steps_per_epoch)
        shuffle = torch.Generator().manual_seed(cfg["seed"])
        t0 = time.perf_counter()
        model.train()
        for _ in range(cfg["epochs"]):
            order = torch.randperm(images.shape[0], generator=shuffle)
            for i in range(0, images.shape[0], cfg["batch_size"]):
                idx = order[i:i + cfg["batch_size"]]
                loss = torch.nn.functional.cross_entropy(model(images[idx]), labels[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
        model.eval()
        seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
    sizes = {s: int(dataset(s, recipe["split"]["seed"])[0].shape[0]) for s in SPLITS}
    acc = {s: accuracy(model, *dataset(s, recipe["split"]["seed"])) for s in ("train", "test")}
    info = {"train_s": round(seconds, 2), "split_sizes": sizes, "float_accuracy": acc, "torch": torch.__version__}
    return model, info


def _folder(recipe: dict[str, Any]) -> Path:
    return cache_root() / "models" / f"digits-cnn-{recipe_hash(recipe)}"


def _train_and_cache(dest: Path, recipe: dict[str, Any]) -> None:
    import shutil
    import tempfile

    from safetensors.torch import save_file

    model, info = train(recipe)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps({"recipe": recipe, "recipe_hash": recipe_hash(recipe), **info}, indent=1))
    try:
        os.replace(tmp, dest)
    except OSError:  # another process cached the same recipe first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)


def builtin_digits_cnn(prepare: bool, recipe: dict[str, Any] = RECIPE):
    dest = _folder(recipe)
    if prepare and not (dest / "config.json").exists():
        _train_and_cache(dest, recipe)
    meta: dict[str, Any] = {"recipe": recipe, "recipe_hash": recipe_hash(recipe)}
    if (dest / "config.json").exists():
        saved = json.loads((dest / "config.json").read_text())
        meta.update(split_sizes=saved["split_sizes"], float_accuracy=saved["float_accuracy"], train_s=saved["train_s"])
    return ModelSource(name=NAME, path=str(dest), kind="builtin", task=TASK, meta=meta,
                       note=("a conv+bn+relu CNN (24k parameters) trained by the harness on scikit-learn's load_digits "
                             "(8x8 images; fixed hash split: train / calibration / held-out test)"))


def load_vision(source):
    """(float model in eval mode, None): vision models have no tokenizer; their data is read by
    split (`dataset_of`)."""
    from safetensors.torch import load_file

    path = Path(source.path) / "model.safetensors"
    if not path.is_file():
        raise HarnessError(f"model '{source.name}' is not trained yet ({path} is missing): plan the suite again")
    model = build_model(source.meta.get("recipe", RECIPE)["arch"])
    model.load_state_dict(load_file(str(path)))
    model.eval()
    model.qharness_source = source
    return model, None


def vision_shapes(source):
    """Conv and Linear layers as LinearShapes (a conv's in_features = in_channels x kernel area)."""
    import math

    import torch

    # lazy: `import harness.models.vision` stays free of pydantic, torch
    from harness.adapters.base import LinearShape, ModelShapes

    with torch.device("meta"):
        skeleton = build_model(source.meta.get("recipe", RECIPE)["arch"])
    layers = []
    for name, m in skeleton.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            layers.append(LinearShape(name, m.in_channels * math.prod(m.kernel_size) // m.groups, m.out_channels))
        elif isinstance(m, torch.nn.Linear):
            layers.append(LinearShape(name, m.in_features, m.out_features))
    return ModelShapes(linears=tuple(layers), architecture="DigitsCNN", source=source, task=TASK)
