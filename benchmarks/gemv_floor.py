"""What cuBLAS's M=1 GEMVs alone reach on this GPU: every weight matrix of one Llama-2-7B decode
step (fused qkv / gate-up layout, lm_head; fp16, random data) captured as one CUDA graph, 64 timed
replays, against the copy and read-only bandwidth measured in the same process. The decode floor
study's third part (benchmarks/decode_floor.py), without building a model: a short device call."""
import torch
import torch.nn.functional as F

from harness.perf.decode import capture, replay_seconds
from harness.perf.probes import run_probes

bw = run_probes("cuda", names=["copy"])["memory_bandwidth"].value
big = torch.randn(1 << 31, device="cuda", dtype=torch.float16)
ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
ms = []
for i in range(13):
    ev[0].record(); big.sum(); ev[1].record(); ev[1].synchronize()
    if i >= 3:
        ms.append(ev[0].elapsed_time(ev[1]))
read_bw = big.numel() * 2 / (sorted(ms)[5] / 1e3)
del big
h, inter, layers, vocab = 4096, 11008, 32, 32000
shapes = [(3 * h, h), (h, h), (2 * inter, h), (h, inter)] * layers + [(vocab, h)]
mats = [torch.randn(s, device="cuda", dtype=torch.float16) for s in shapes]
xs = {k: torch.randn(1, k, device="cuda", dtype=torch.float16) for k in (h, inter)}
nbytes = sum(m.numel() * 2 for m in mats)
g = capture(lambda: [F.linear(xs[m.shape[1]], m) for m in mats])
for _ in range(3):
    g.replay()
t = sorted(replay_seconds(g, 64))[32]
print(f"{torch.cuda.get_device_name()}: copy {bw / 1e12:.3f} TB/s, read-only {read_bw / 1e12:.3f} TB/s")
print(f"GEMV-only graph ({len(mats)} fp16 matrices, {nbytes / 1e9:.2f} GB): {t * 1e3:.3f} ms median of 64 = "
      f"{nbytes / t / 1e12:.3f} TB/s = {nbytes / t / bw:.1%} of copy; a 7B fp16 step made of these GEMVs alone: "
      f"{1 / t:.1f} tok/s = {(1 / t) / (bw / 13.476e9):.1%} of the 13.48 GB copy roofline")
