"""One cell in its own process: load the model, quantize, measure, report.

Run by the driver as `python -m harness.run.worker CELL_DIR`, as a warm worker (`--wait`: the cell
folder comes on stdin), or forked by harness.run.zygote's fork server (`forked_main`, the same
from there on). Talks back through files and stdout only:
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
from dataclasses import replace
from pathlib import Path

from harness.models.zoo import quiet_libraries

VALUES = "values.jsonl"
DONE = "done.json"
CELL = "cell.json"
EXIT_USER_ERROR = 3
WAIT = "--wait"  # started ahead of its cell: import everything, then read the cell folder from stdin
PRELOAD = "preload "  # a line before the cell folder: the model the cell will load (_preload)
IDLE_NICE = 19  # a warm worker's priority while it imports beside a running cell (_wait_for_cell)


class Emitter:
    def __init__(self, cell_dir: Path):
        self.path = cell_dir / VALUES

    def values(self, measurement: str, values, declared=None) -> None:
        """Append `values` (MetricValues) of `measurement`, each stamped with what it means: its
        declaration in `declared` (default: the harness's own groups, harness.metrics.meaning)."""
        from harness.metrics.meaning import MEASURED_BY_EVERY_CELL, stamp

        declared = MEASURED_BY_EVERY_CELL[measurement] if declared is None else declared
        payload = "".join(json.dumps({"measurement": measurement, **stamp(measurement, v, declared)}) + "\n" for v in values)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, payload.encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    @staticmethod
    def progress(done: int, total: int, what: str) -> None:
        print(json.dumps({"progress": [done, total, what]}), flush=True)


def run_cell(cell_dir: Path, assigned_at: float | None = None) -> None:
    """Run the cell in `cell_dir`; `assigned_at`: when a warm worker got it (else: process start)."""
    quiet_libraries()
    # every import a cell needs, before `started`: their time is start-up (a warm worker has them already)
    import torch

    from harness.adapters import get_adapter
    from harness.adapters.base import CalibrationSet  # noqa: F401
    from harness.metrics import get_measurement  # noqa: F401
    from harness.metrics.base import CellContext, MetricValue  # noqa: F401
    from harness.metrics.meaning import MEASUREMENT_TIMING  # noqa: F401
    from harness.metrics.scoring import cell_scorer, declare_reference_windows  # noqa: F401
    from harness.models.zoo import load_model, resolve_model
    from harness.run.suite import CellSpec

    started = time.time()  # the interpreter is up and torch, transformers and the harness are imported
    cell = CellSpec.model_validate_json((cell_dir / CELL).read_text())
    emit = Emitter(cell_dir)
    device = torch.device(cell.device)

    emit.progress(0, 1, "loading model")
    t0 = time.perf_counter()
    preloaded = _PRELOADED.pop(cell.model, None)
    if preloaded is not None:
        source, model, tokenizer, preload_s = preloaded
    else:
        source = resolve_model(cell.model, prepare=False)
        model, tokenizer = load_model(source)
    load_s = time.perf_counter() - t0
    phase = _phase_recorder(emit, assigned_at)
    phase("startup_s", max(0.0, started - (assigned_at or _process_start())))
    phase("load_s", load_s, **({"preloaded_while_waiting_s": round(preload_s, 3)} if preloaded else {}))
    adapter = get_adapter(cell.backend)
    qmodel, spread, placement = _quantize(cell, adapter, model, tokenizer, device, emit, phase)
    reference_model = _measure(cell, cell_dir, source, qmodel, tokenizer, device, spread, emit, phase)
    _write_done(cell_dir, device, adapter, qmodel, reference_model, placement)


def _phase_recorder(emit: Emitter, assigned_at: float | None):
    """phase(name, seconds, **params): one `timing` value, written as soon as known (kept if the
    cell dies later)."""
    from harness.metrics.base import MetricValue

    return lambda name, seconds, **params: emit.values("timing", [MetricValue(
        name, seconds, "s", n=1, protocol="wall clock of the cell's phases (worker process)",
        params={"warm_worker": assigned_at is not None, **params})])


def _calibration(cell, tokenizer):
    """The cell's calibration windows (None: its backend takes none)."""
    if not cell.calibration:
        return None
    from harness.adapters.base import CalibrationSet
    from harness.models.corpora import calibration_windows_at

    c = cell.calibration
    ids, starts, stream_tokens = calibration_windows_at(tokenizer, c["corpus"], c["n_samples"], c["seq_len"], c["seed"])
    return CalibrationSet(c["corpus"], c["n_samples"], c["seq_len"], c["seed"], ids, starts, stream_tokens)


def _quantize(cell, adapter, model, tokenizer, device, emit: Emitter, phase):
    """Quantize the model (on the CPU first when it is spread over several GPUs, then placed) and
    record its footprint and the quantization time. Returns (qmodel, spread, placement)."""
    import torch

    from harness.metrics.base import MetricValue

    variant = adapter.parse_variant(cell.variant_params)
    calibration = _calibration(cell, tokenizer)

    emit.progress(0, 1, f"quantizing ({cell.backend}:{cell.variant})")
    spread = cell.gpus > 1 and device.type == "cuda"  # one model over several GPUs: quantize on CPU, then place
    t0 = time.perf_counter()
    qmodel = adapter.quantize(model, variant, calibration, torch.device("cpu") if spread else device)
    quantize_s = time.perf_counter() - t0
    phase("quantize_s", quantize_s)
    placement = None
    if spread:
        from harness.run.gpu_placement import spread_over_gpus

        placement = spread_over_gpus(qmodel, cell.gpus)
    n_weights, n_bytes = qmodel.linear_stats()
    emit.values("footprint", [
        MetricValue("weight_bytes", float(qmodel.weight_bytes()), "bytes", protocol="storage: all parameters and buffers, each storage once"),
        MetricValue("bits_per_weight", qmodel.bits_per_weight(), "bits", n=n_weights,
                    protocol="storage of linear layers (packed weights + scales + zeros) / their weights; lm_head excluded",
                    params={"linear_bytes": n_bytes}),
    ])
    # calibrated adapters reuse cached artifacts: then this is the load time, and the params say
    # "hit" and carry the seconds the original quantization took (harness/models/artifacts.py)
    cache = {k: qmodel.info[k] for k in ("artifact_cache", "artifact_key", "quantize_s") if k in qmodel.info}
    emit.values("quantize", [MetricValue("seconds", quantize_s, "s", n=1, protocol="wall clock, one run",
                                         params={"calibration": calibration.describe() if calibration else None,
                                                 **cache})])
    return qmodel, spread, placement


def _measure(cell, cell_dir: Path, source, qmodel, tokenizer, device, spread: bool, emit: Emitter, phase):
    """Run the cell's measurements in order, each value written as it comes. Returns the lazy
    reference model (None: the cell has no reference)."""
    from harness.metrics import get_measurement
    from harness.metrics.base import CellContext
    from harness.metrics.meaning import MEASUREMENT_TIMING
    from harness.metrics.scoring import cell_scorer, declare_reference_windows

    reference_dir = cell_dir.parent / cell.reference_cell_id if cell.reference_cell_id else None
    scorer = cell_scorer(qmodel, cell_dir, reference_dir, cell.is_reference, emit.progress)
    if cell.measurements and (warm_s := scorer.warm_up()):
        phase("warmup_s", warm_s)  # GPU start-up, kept out of the first measurement's time
    measure_start = time.perf_counter()
    reference_model = _reference_builder(cell, source, device, spread) if cell.reference else None
    ctx = CellContext(qmodel=qmodel, tokenizer=tokenizer, model_name=cell.model, artifact_dir=cell_dir,
                      reference_dir=reference_dir, reference_model=reference_model, progress=emit.progress,
                      is_reference=cell.is_reference, scorer=scorer)
    measurements = []
    for spec in cell.measurements:
        spec = dict(spec)
        measurement = get_measurement(spec.pop("name"))
        measurements.append((measurement, measurement.Params.model_validate(spec)))
    declare_reference_windows(ctx, measurements)
    for measurement, params in measurements:
        t0, before = time.perf_counter(), replace(scorer.stats)
        values = measurement.run(ctx, params)
        emit.values(measurement.name, values + measurement_timing(time.perf_counter() - t0, scorer.stats.since(before)),
                    measurement.metrics + MEASUREMENT_TIMING)
    phase("measure_s", time.perf_counter() - measure_start, reference_store_bytes=scorer.record.bytes() if scorer.record else 0)
    return reference_model


def _write_done(cell_dir: Path, device, adapter, qmodel, reference_model, placement) -> None:
    """done.json, written last and atomically: the cell's provenance."""
    import torch

    provenance = {
        "reference_model_loaded": bool(reference_model and reference_model.built),  # outliers/sensitivity only
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
    """A lazy, cached builder of the cell's reference model, for the measurements that need both
    models layer by layer (outliers, sensitivity, a sentence encoder without stored vectors);
    divergence and drift read what the reference cell stored instead. `build.built` says whether
    it was needed."""
    built = []

    def build():
        if not built:
            import torch

            from harness.adapters import get_adapter
            from harness.models.zoo import load_model

            adapter = get_adapter(cell.reference["backend"])
            model, _ = load_model(source)
            variant = adapter.parse_variant(cell.reference["variant_params"])
            built.append(adapter.quantize(model, variant, None, torch.device("cpu") if spread else device))
            if spread:
                from harness.run.gpu_placement import spread_over_gpus

                spread_over_gpus(built[0], cell.gpus)
            build.built = True
        return built[0]

    build.built = False
    return build


def measurement_timing(seconds: float, stats) -> list:
    """Where a measurement's time went: its wall time, and the tokens its model read per second
    (when it scored text through the cell's Scorer)."""
    from harness.metrics.base import MetricValue

    detail = {"forward_tokens": stats.forward_tokens, "scored_positions": stats.scored, "rows": stats.rows,
              "rows_from_an_earlier_pass": stats.cached_rows, "scoring_s": round(stats.seconds, 3)}
    out = [MetricValue("wall_s", seconds, "s", n=1, protocol="wall clock of the measurement in its cell", params=detail)]
    if stats.forward_tokens:
        out.append(MetricValue("tokens_per_s", stats.forward_tokens / seconds, "tokens/s", n=stats.forward_tokens,
                               protocol="tokens read by the model (padding included) / the measurement's wall time",
                               params=detail))
    return out


def _process_start() -> float:
    """When this worker process started (epoch seconds): its start-up (interpreter, imports)
    counts as a phase of the cell."""
    import psutil

    return psutil.Process().create_time()


def import_cell_modules() -> None:
    """The imports every cell needs (~8 s on 2 cores): a warm worker does them while it waits, the
    fork server of harness.run.zygote once for all its workers."""
    quiet_libraries()
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401 - the slow part (~4 s on 2 cores)

    import harness.adapters.base  # noqa: F401
    import harness.metrics.scoring  # noqa: F401


def forked_main(stdin, stdout, log: str, env: dict[str, str], cwd: str) -> None:
    """A warm worker forked by harness.run.zygote's fork server (its imports already done): the
    driver's environment and working directory, its own session (a timeout kills its process
    group), the pipes as stdin/stdout and `log` as stderr; then as `python -m harness.run.worker
    --wait`. Never returns."""
    server = os.getppid()
    os.setsid()
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for conn, fd in ((stdin, 0), (stdout, 1)):
        os.dup2(conn.fileno(), fd)
        conn.close()
    err = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(err, 2)
    os.close(err)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115 - the process's own stdin, kept for its life
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    _no_process_shared_locks()
    _exit_now(main([WAIT], parent=server))


def _no_process_shared_locks() -> None:
    """tqdm's first progress bar creates a multiprocessing lock, a named semaphore registered with
    the resource tracker a forked worker shares with the driver; the worker ends with os._exit, so
    the tracker warned of a "leaked semaphore" on the user's terminal at the end of the run
    (compressed-tensors' bars, in llm-compressor cells). A cell's bars live in one process: a
    thread lock is all they need."""
    import threading

    try:
        from tqdm import tqdm
    except ImportError:
        return
    tqdm.set_lock(threading.RLock())


def _wait_for_cell() -> Path | None:
    """A warm worker (harness.run.executor.LocalExecutor): do the imports every cell does (none
    left in a worker forked by harness.run.zygote; and create the CUDA context if cells use CUDA),
    load the model a `preload` line names, then wait for the cell folder on stdin and send stderr
    to its worker.log. None when the driver closes stdin without a cell.

    The imports run at the lowest CPU priority (`IDLE_NICE`) when this process may raise it back
    once it has its cell: they happen beside the running cell, and on a small machine a
    full-priority import took a core from the cell's OpenMP threads, whose every parallel region
    then waited for it (2 cores: rtn's quantize 0.5 s alone, ~7 s beside a warming worker). At
    nice 19 the import takes only what the cell leaves idle (its single-threaded stretches)."""
    lowered = _lower_priority()
    import_cell_modules()
    import torch

    if os.environ.get("QHARNESS_WARM_CUDA") and torch.cuda.is_available():
        torch.cuda.init()
    line = sys.stdin.readline().strip()
    while line.startswith(PRELOAD):
        _preload(line[len(PRELOAD):])
        line = sys.stdin.readline().strip()
    if not line:
        return None
    if lowered:
        _restore_priority()
    cell_dir = Path(line)
    fd = os.open(cell_dir / "worker.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    return cell_dir


_PRELOADED: dict[str, tuple] = {}  # model name -> (source, model, tokenizer, seconds): loaded while waiting


def _preload(name: str) -> None:
    """Load the model the driver says the cell will need while this worker waits (still at its
    low priority), so the cell starts from it: ~1.4 s of every cell of a 2-core llm-int4 run.
    Only a causal LM from local files, and only where its float32 weights take at most a quarter
    of the memory available now (the running cell needs the rest); anything else, or any error,
    leaves the loading to the cell, which reports its own errors."""
    try:
        import psutil
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from harness.models.zoo import load_model, resolve_model

        t0 = time.perf_counter()
        source = resolve_model(name, prepare=False)
        if source.task != "causal-lm" or source.kind not in ("builtin", "local", "tiny"):
            return
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(source.path))
        if 4 * sum(p.numel() for p in skeleton.parameters()) > psutil.virtual_memory().available / 4:
            return
        model, tokenizer = load_model(source)
        _PRELOADED[name] = (source, model, tokenizer, time.perf_counter() - t0)
    except Exception:  # noqa: BLE001 - an optimization only: the cell loads the model itself
        return


def _lower_priority() -> bool:
    """Drop this process to nice `IDLE_NICE` if it will be allowed to return to nice 0 (root, or
    an RLIMIT_NICE that permits it: raising a priority back needs one or the other); True if it did.
    Where the kernel groups processes by session (autogroup: each worker has its own session),
    a nice value only ranks threads within their group, so the group's own nice is set too."""
    if not hasattr(os, "setpriority"):
        return False
    import resource

    soft = resource.getrlimit(resource.RLIMIT_NICE)[0]
    if os.geteuid() != 0 and soft != resource.RLIM_INFINITY and soft < 20:  # nice 0 <-> RLIMIT_NICE 20
        return False
    try:
        os.setpriority(os.PRIO_PROCESS, 0, IDLE_NICE)
    except OSError:
        return False
    _set_autogroup_nice(IDLE_NICE)
    return True


def _restore_priority() -> None:
    """Back to nice 0, for the session's autogroup and every thread (Linux applies a nice value
    per thread, and threads started during the imports inherited the low one)."""
    _set_autogroup_nice(0)
    tids = [int(t) for t in os.listdir("/proc/self/task")] if os.path.isdir("/proc/self/task") else [0]
    for tid in tids:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, 0)
        except OSError:
            pass  # a thread that has ended, or no permission after all: the cell runs, just lower


def _set_autogroup_nice(nice: int) -> None:
    """The nice value of this session's scheduling group (Linux autogroup), where there is one."""
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write(str(nice))
    except OSError:
        pass  # no autogroups (disabled, or not Linux): the process nice is all there is


def _die_with_driver(parent: int | None = None) -> None:
    """Linux: have the kernel kill this worker if its parent dies (e.g. SIGKILL): the driver, or
    for a forked worker the fork server, which exits when the driver does. So an orphan never
    writes into a cell that a resumed run is recomputing."""
    driver = parent or os.environ.get("QHARNESS_DRIVER_PID")
    if not driver or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(driver):  # the parent died before prctl took effect
        os._exit(EXIT_USER_ERROR)


def main(argv: list[str] | None = None, parent: int | None = None) -> int:
    from harness.errors import HarnessError

    argv = sys.argv[1:] if argv is None else argv
    _die_with_driver(parent)
    assigned_at = None
    if argv[0] == WAIT:
        cell_dir = _wait_for_cell()
        if cell_dir is None:
            return 0
        assigned_at = time.time()
    else:
        cell_dir = Path(argv[0])
    try:
        run_cell(cell_dir, assigned_at)
    except HarnessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as exc:  # noqa: BLE001 - the log keeps the traceback, the reason is the last line
        import traceback

        traceback.print_exc()
        print(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", file=sys.stderr)
        return 1
    return 0


def _exit_now(code: int) -> None:
    """End the worker process without the interpreter's shutdown: its values and done.json are
    already on disk (fsynced, atomic), and tearing down torch, transformers and a model took ~1.9 s
    of every cell on 2 cores (the driver waits for the exit). The OS frees the memory at once."""
    import logging

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    _exit_now(main())
