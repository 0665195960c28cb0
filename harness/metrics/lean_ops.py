"""Llama-family element-wise work as fewer GPU kernels while the scorer runs a model on CUDA.

transformers runs RMSNorm as a float32 chain (upcast, square, mean, rsqrt, multiply, cast back,
times the weight: ~7 kernels, 3 of them over float32 copies) and the rotary embedding as
q * cos + cat(-x2, x1) * sin (5 kernels over q, 5 over k). On the H200 with a 7B in fp16 they took
~8% and ~13% of a scoring pass's GPU time (benchmarks/results/lean-ops-h200/). Here RMSNorm is
weight * F.rms_norm(x) (one fused kernel that accumulates in float32 and returns x's dtype, then
the weight), and the rotary embedding works on the two halves of each head with a multiply and a
fused multiply-add each, written into one output.

The arithmetic is the same; only the rounding of intermediates differs (fp16: perplexity moved
by ~1e-5 relative). Each rewrite is checked against the original on the model's device and
dtype before it is used, only for the transformers families listed in LEAN_FAMILIES, and only
while the scorer runs the model (a context that puts the originals back): the model object is
not changed. Elsewhere (CPU, other runtimes) nothing is rewritten."""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

LEAN_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")  # transformers.models.<family>.modeling_<family>
Patch = tuple[object, str, Callable]  # (owner, attribute, replacement)


def rms_norm_forward(self, x: torch.Tensor) -> torch.Tensor:
    """Llama's RMSNorm: weight * (x / sqrt(mean(x^2) + eps)) computed in float32, cast to x's dtype."""
    return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.variance_epsilon)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    """transformers' apply_rotary_pos_emb (q * cos + rotate_half(q) * sin, the same for k)."""
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + cat(-x2, x1) * sin, half by half: first half x1*c1 - x2*s1, second x2*c2 + x1*s2."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = torch.empty(torch.broadcast_shapes(x.shape, cos.shape), dtype=torch.result_type(x, cos), device=x.device)
    first, second = out[..., :half], out[..., half:]
    torch.mul(x1, cos[..., :half], out=first).addcmul_(x2, sin[..., :half], value=-1)
    torch.mul(x2, cos[..., half:], out=second).addcmul_(x1, sin[..., half:])
    return out


def lean_patches(module: torch.nn.Module) -> list[Patch]:
    """The rewrites that apply to this model: RMSNorm classes and rotary functions of its
    LEAN_FAMILIES modules whose outputs match the originals on the model's device and dtype."""
    patches: list[Patch] = []
    checked: set[int] = set()
    for sub in module.modules():
        cls = type(sub)
        family = _family(cls.__module__)
        if family is None or id(cls) in checked:
            continue
        checked.add(id(cls))
        if cls.__name__.endswith("RMSNorm") and _norm_matches(sub):
            patches.append((cls, "forward", rms_norm_forward))
        if cls.__name__.endswith("Attention"):
            owner = sys.modules[cls.__module__]
            original = getattr(owner, "apply_rotary_pos_emb", None)
            if original is not None and id(owner) not in checked and _rotary_matches(original, sub):
                patches.append((owner, "apply_rotary_pos_emb", apply_rotary_pos_emb))
            checked.add(id(owner))
    return patches


@contextlib.contextmanager
def patched(patches: list[Patch]) -> Iterator[None]:
    """The rewrites in place for the duration, the originals back afterwards (also on errors)."""
    saved = [(owner, name, owner.__dict__[name]) for owner, name, _ in patches]
    try:
        for owner, name, new in patches:
            setattr(owner, name, new)
        yield
    finally:
        for owner, name, old in saved:
            setattr(owner, name, old)


def _family(module_name: str) -> str | None:
    parts = module_name.split(".")
    if len(parts) == 4 and parts[:2] == ["transformers", "models"] and parts[3] == f"modeling_{parts[2]}":
        return parts[2] if parts[2] in LEAN_FAMILIES else None
    return None


def _reference_input(shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    generator = torch.Generator(device="cpu").manual_seed(0)
    return torch.randn(shape, generator=generator).to(device=like.device, dtype=like.dtype)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to the rounding of intermediates in the tensors' dtype."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    tol = 1e-5 if a.dtype == torch.float32 else 2e-2
    return bool(((a.float() - b.float()).abs().max() <= tol * max(1.0, a.float().abs().max().item())).item())


@torch.no_grad()
def _norm_matches(norm: torch.nn.Module) -> bool:
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or not hasattr(norm, "variance_epsilon"):
        return False
    x = _reference_input((3, 5, weight.shape[0]), weight) * 3
    try:
        return _close(type(norm).forward(norm, x), rms_norm_forward(norm, x))
    except Exception:  # noqa: BLE001 - any doubt: keep the original
        return False


@torch.no_grad()
def _rotary_matches(original: Callable, attention: torch.nn.Module) -> bool:
    params = list(inspect.signature(original).parameters)
    head_dim = getattr(attention, "head_dim", None)
    weight = next((p for p in attention.parameters() if p.is_floating_point()), None)
    if params != ["q", "k", "cos", "sin", "unsqueeze_dim"] or not head_dim or weight is None:
        return False
    q, k = _reference_input((2, 3, 7, head_dim), weight), _reference_input((2, 1, 7, head_dim), weight) * 2
    angles = _reference_input((2, 7, head_dim), weight).float() * 5
    cos, sin = angles.cos().to(weight.dtype), angles.sin().to(weight.dtype)
    try:
        return all(_close(a, b) for a, b in zip(original(q, k, cos, sin), apply_rotary_pos_emb(q, k, cos, sin)))
    except Exception:  # noqa: BLE001 - any doubt: keep the original
        return False
