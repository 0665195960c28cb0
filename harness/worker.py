"""One cell in its own process: load the model, quantize, measure, report.

Run by the driver as `python -m harness.worker CELL_DIR`. Talks back through files and stdout only:
- stdout: JSON progress lines {"progress": [done, total, what]} for the driver's progress bar;
- CELL_DIR/values.jsonl: one JSON line per finished metric value, fsynced as it is produced,
  so values measured before a crash survive it;
- CELL_DIR/done.json: written last (atomically) with the cell's provenance;
- stderr (the cell's log): on failure its last line is the reason.
A crash, hang or out-of-memory here can cost only this cell."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

from harness.models import quiet_libraries

VALUES = "values.jsonl"
DONE = "done.json"
CELL = "cell.json"
EXIT_USER_ERROR = 3


class Emitter:
    def __init__(self, cell_dir: Path):
        self.path = cell_dir / VALUES

    def values(self, measurement: str, values) -> None:
        payload = "".join(json.dumps({"measurement": measurement, **asdict(v)}) + "\n" for v in values)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, payload.encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    @staticmethod
    def progress(done: int, total: int, what: str) -> None:
        print(json.dumps({"progress": [done, total, what]}), flush=True)


def run_cell(cell_dir: Path) -> None:
    quiet_libraries()
    import torch

    from harness.adapters import get_adapter
    from harness.adapters.base import CalibrationSet
    from harness.metrics import get_measurement
    from harness.metrics.base import CellContext, MetricValue
    from harness.models import load_model, resolve_model
    from harness.suite import CellSpec

    cell = CellSpec.model_validate_json((cell_dir / CELL).read_text())
    emit = Emitter(cell_dir)
    device = torch.device(cell.device)

    emit.progress(0, 1, "loading model")
    source = resolve_model(cell.model, prepare=False)
    model, tokenizer = load_model(source)
    adapter = get_adapter(cell.backend)
    variant = adapter.parse_variant(cell.variant_params)

    calibration = None
    if cell.calibration:
        from harness.data import calibration_windows_at

        c = cell.calibration
        ids, starts, stream_tokens = calibration_windows_at(tokenizer, c["corpus"], c["n_samples"], c["seq_len"], c["seed"])
        calibration = CalibrationSet(c["corpus"], c["n_samples"], c["seq_len"], c["seed"], ids, starts, stream_tokens)

    emit.progress(0, 1, f"quantizing ({cell.backend}:{cell.variant})")
    spread = cell.gpus > 1 and device.type == "cuda"  # one model over several GPUs: quantize on CPU, then place
    t0 = time.perf_counter()
    qmodel = adapter.quantize(model, variant, calibration, torch.device("cpu") if spread else device)
    quantize_s = time.perf_counter() - t0
    placement = None
    if spread:
        from harness.placement import spread_over_gpus

        placement = spread_over_gpus(qmodel, cell.gpus)
    n_weights, n_bytes = qmodel.linear_stats()
    emit.values("footprint", [
        MetricValue("weight_bytes", float(qmodel.weight_bytes()), "bytes", protocol="storage: all parameters and buffers, each storage once"),
        MetricValue("bits_per_weight", qmodel.bits_per_weight(), "bits", n=n_weights,
                    protocol="storage of linear layers (packed weights + scales + zeros) / their weights; lm_head excluded",
                    params={"linear_bytes": n_bytes}),
    ])
    # calibrated adapters reuse cached artifacts: then this is the load time, and the params say
    # "hit" and carry the seconds the original quantization took (harness/artifacts.py)
    cache = {k: qmodel.info[k] for k in ("artifact_cache", "artifact_key", "quantize_s") if k in qmodel.info}
    emit.values("quantize", [MetricValue("seconds", quantize_s, "s", n=1, protocol="wall clock, one run",
                                         params={"calibration": calibration.describe() if calibration else None,
                                                 **cache})])

    reference_model = _reference_builder(cell, source, device, spread) if cell.reference else None
    for spec in cell.measurements:
        spec = dict(spec)
        measurement = get_measurement(spec.pop("name"))
        params = measurement.Params.model_validate(spec)
        reference_dir = cell_dir.parent / cell.reference_cell_id if cell.reference_cell_id else None
        ctx = CellContext(qmodel=qmodel, tokenizer=tokenizer, model_name=cell.model, artifact_dir=cell_dir,
                          reference_dir=reference_dir, reference_model=reference_model, progress=emit.progress)
        emit.values(measurement.name, measurement.run(ctx, params))

    provenance = {
        "backend_versions": adapter.versions(),
        "backend_info": qmodel.info,
        "torch_threads": torch.get_num_threads(),
        "pid": os.getpid(),
    }
    if device.type == "cuda":
        provenance["cuda_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        provenance["gpus"] = torch.cuda.device_count()  # visible to this cell (Ray: the GPUs it was given)
        if placement:
            provenance["placement"] = placement
    tmp = cell_dir / (DONE + ".tmp")
    tmp.write_text(json.dumps(provenance, default=str))
    os.replace(tmp, cell_dir / DONE)


def _reference_builder(cell, source, device, spread: bool = False):
    """A lazy, cached builder of the cell's reference model, for measurements that compare live
    (e.g. KL divergence needs both models' full distributions on the same tokens)."""
    built = []

    def build():
        if not built:
            import torch

            from harness.adapters import get_adapter
            from harness.models import load_model

            adapter = get_adapter(cell.reference["backend"])
            model, _ = load_model(source)
            variant = adapter.parse_variant(cell.reference["variant_params"])
            built.append(adapter.quantize(model, variant, None, torch.device("cpu") if spread else device))
            if spread:
                from harness.placement import spread_over_gpus

                spread_over_gpus(built[0], cell.gpus)
        return built[0]

    return build


def _die_with_driver() -> None:
    """Linux: have the kernel kill this worker if the driver dies (e.g. SIGKILL), so an orphan
    never writes into a cell that a resumed run is recomputing."""
    driver = os.environ.get("QHARNESS_DRIVER_PID")
    if not driver or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(driver):  # the driver died before prctl took effect
        os._exit(EXIT_USER_ERROR)


def main(argv: list[str] | None = None) -> int:
    from harness.errors import HarnessError

    argv = sys.argv[1:] if argv is None else argv
    _die_with_driver()
    cell_dir = Path(argv[0])
    try:
        run_cell(cell_dir)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as exc:  # noqa: BLE001 - the log keeps the traceback, the reason is the last line
        import traceback

        traceback.print_exc()
        print(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
