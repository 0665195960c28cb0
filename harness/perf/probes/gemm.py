"""Matrix-multiply ceilings per dtype: a large square product through torch (cuBLAS on GPU,
oneDNN/MKL on CPU). int8 through torch._int_mm, fp8 through torch._scaled_mm where the device
supports them; a dtype that cannot run here is returned with value None and the reason."""

from __future__ import annotations

from collections.abc import Callable

from harness.perf.probes import Ceiling
from harness.perf.timing import repeat


def _float(dtype_name: str):
    import torch

    dtype = getattr(torch, dtype_name)

    def make(n: int, device: str) -> Callable[[], object]:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        return lambda: a @ b

    return make


def _int8(n: int, device: str):
    import torch

    a = torch.randint(-127, 127, (n, n), dtype=torch.int8, device=device)
    b = torch.randint(-127, 127, (n, n), dtype=torch.int8, device=device)
    if str(device).startswith("cuda"):
        b = b.t().contiguous().t()  # column-major B: cuBLASLt's fast int8 path (row-major B ran at 127 TOP/s on H100)
    return lambda: torch._int_mm(a, b)


def _fp8(n: int, device: str):
    import torch

    if not str(device).startswith("cuda") or torch.cuda.get_device_capability() < (8, 9):
        raise RuntimeError("fp8 matrix products need an NVIDIA GPU of compute capability 8.9 or newer")
    a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
    b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn).t()  # _scaled_mm wants column-major B
    one = torch.ones((), device=device)
    return lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)


GPU_DTYPES = {"fp32": _float("float32"), "tf32": _float("float32"), "bf16": _float("bfloat16"),
              "fp16": _float("float16"), "int8": _int8, "fp8": _fp8}
CPU_DTYPES = {"fp32": _float("float32"), "bf16": _float("bfloat16"), "int8": _int8}


def probe(device: str, quick: bool = False) -> list[Ceiling]:
    import torch

    cuda = str(device).startswith("cuda")
    n = 8192 if cuda else (512 if quick else 1024)
    warmup, repeats = (3, 10) if cuda else (1, 3 if quick else 5)
    out = []
    for name, make in (GPU_DTYPES if cuda else CPU_DTYPES).items():
        unit = "OP/s" if name.startswith("int") else "FLOP/s"
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = name == "tf32"
        try:
            fn = make(n, device)
            samples = repeat(fn, device, warmup, repeats)
        except Exception as exc:  # noqa: BLE001 - a dtype the device or build lacks is a finding
            out.append(Ceiling(f"gemm_{name}", None, unit, note=f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"))
            continue
        finally:
            torch.backends.cuda.matmul.allow_tf32 = previous
        rate, spread = samples.rate_spread(2.0 * n**3)
        out.append(Ceiling(f"gemm_{name}", rate, unit, samples.n, spread,
                           f"{n}x{n}x{n} random operands, 2n^3 ops, warm-up {warmup}, median of {repeats}",
                           samples.seconds))
    return out
