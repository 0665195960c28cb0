"""The Ray executor: the same records as the local executor, a killed Ray worker is retried (or,
retries spent, recorded as failed with Ray's reason) while the run finishes, resume works, and
per-cell resources are derived from the cell. One local Ray instance (2 CPUs) per test session."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from conftest import PLUGINS, tiny_suite, write_suite
from harness.errors import HarnessError
from harness.run.runner import run_suite
from harness.results.run_dir import RunDir, load_records
from harness.run.suite import CellSpec, load_suite

ray = pytest.importorskip("ray")

from harness.run.executor import LocalExecutor  # noqa: E402
from harness.run.ray_executor import HW_SHARE, RayExecutor, _infeasible  # noqa: E402

CHAOS = "chaos_adapter:ChaosAdapter"
TIMING = {"seconds", "duration_s", "wall_s", "tokens_per_s", "startup_s", "load_s", "quantize_s", "measure_s"}  # wall-clock metrics: not expected to repeat


@pytest.fixture(scope="module")
def ray_session():
    """One small local Ray instance for this module (2 CPUs, no dashboard, small object store),
    shut down after it so its daemons do not idle through the rest of the test session."""
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 1024**2, log_to_driver=False,
                 configure_logging=False)
    yield
    ray.shutdown()


def _executor(tmp_path: Path, **kwargs) -> RayExecutor:
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(PLUGINS), os.environ.get("PYTHONPATH")])),
           "CHAOS_COUNTER": str(tmp_path / "quantize-calls.txt")}
    return RayExecutor(env=env, **kwargs)


def _deterministic(run_dir: Path):
    return {(r.cell_id, r.measurement, r.metric): (None if r.metric in TIMING else r.value, r.n, r.unit, r.status, r.error)
            for r in RunDir(run_dir).current_records()}


def test_ray_gives_the_same_records_as_local(tmp_path, harness_env, ray_session, monkeypatch):
    monkeypatch.setenv("CHAOS_COUNTER", str(tmp_path / "quantize-calls.txt"))
    suite = load_suite(str(tiny_suite(tmp_path / "s.yaml", extra_backends=f"""
        - name: rtn
          variants: [{{bits: 8}}]
        - name: "{CHAOS}"
          variants: [{{mode: raise}}]
        """)))
    run_suite(suite, out=tmp_path / "local", backends=["fp", "rtn"], executor=LocalExecutor())
    result = run_suite(suite, out=tmp_path / "ray", executor=_executor(tmp_path))

    local, remote = _deterministic(tmp_path / "local"), _deterministic(tmp_path / "ray")
    assert len(local) >= 10 and local.keys() <= remote.keys()  # same cells, same metrics (ppl_ratio too:
    for key, (value, n, unit, status, error) in local.items():  # the reference's files were shipped)
        assert remote[key][1:] == (n, unit, status, error), key
        assert remote[key][0] == (value if value is None else pytest.approx(value, rel=1e-6, nan_ok=True)), key
    assert any(k[2] == "ppl_ratio" for k in remote)
    # a cell that fails by itself is recorded with its own reason, not retried (one quantize call)
    assert result.failed == 1
    failed = [v for k, v in remote.items() if k not in local]
    assert [v[4] for v in failed if v[3] == "failed"] == ["RuntimeError: chaos adapter raised on purpose"]
    assert (tmp_path / "quantize-calls.txt").read_text().splitlines().count("raise@quantize") == 1
    cells = load_records(tmp_path / "ray").query("measurement == 'cell' and status == 'ok'")
    executor = cells.provenance.iloc[0]["executor"]
    assert executor["name"] == "ray" and executor["gpus"] == 0 and executor["node_id"]
    assert (tmp_path / "ray" / "report.html").exists()


def _kill_ray_worker_when_started(counter: Path, label: str, times: int, killed: list) -> threading.Thread:
    """Kill (SIGKILL) the Ray worker process that runs `label`'s cell, each time it starts it."""
    import psutil

    def watch():
        deadline = time.monotonic() + 240
        while len(killed) < times and time.monotonic() < deadline:
            started = counter.read_text().splitlines().count(label) if counter.exists() else 0
            if started > len(killed):
                for proc in psutil.process_iter(["cmdline", "ppid"]):
                    cmd = proc.info["cmdline"] or []
                    if "harness.run.worker" in cmd and "qharness-cell-" in cmd[-1] and _variant(Path(cmd[-1])) == label:
                        assert proc.info["ppid"] != os.getpid()  # a Ray worker, never this test
                        os.kill(proc.info["ppid"], signal.SIGKILL)
                        killed.append(proc.info["ppid"])
                        break
            time.sleep(0.2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def _variant(cell_dir: Path) -> str | None:
    try:
        return CellSpec.model_validate_json((cell_dir / "cell.json").read_text()).variant
    except (OSError, ValueError):
        return None


SLOW_SUITE = f"""
name: ray-chaos
models: [tiny:llama]
device: cpu
timeout_s: 120
backends:
  - name: "{CHAOS}"
    variants:
      - {{mode: ok}}
      - {{mode: slow, seconds: 4}}
"""


def test_killed_ray_worker_is_retried_then_failed_with_reason_and_resumed(tmp_path, harness_env, ray_session):
    suite = load_suite(str(write_suite(tmp_path / "s.yaml", SLOW_SUITE)))
    counter, killed = tmp_path / "quantize-calls.txt", []
    watcher = _kill_ray_worker_when_started(counter, "slow@quantize", 2, killed)  # both attempts
    result = run_suite(suite, out=tmp_path / "run", executor=_executor(tmp_path, max_retries=1))
    watcher.join(timeout=5)
    assert len(killed) == 2 and counter.read_text().splitlines().count("slow@quantize") == 2  # Ray retried it
    cells = load_records(tmp_path / "run").query("measurement == 'cell'").set_index("variant")
    assert result.failed == 1 and cells.loc["ok@quantize", "status"] == "ok"  # the run finished
    assert cells.loc["slow@quantize", "status"] == "failed"
    assert cells.loc["slow@quantize", "error"].startswith("Ray worker lost (2 attempts): ")

    result = run_suite(suite, out=tmp_path / "run", resume=True, executor=_executor(tmp_path, max_retries=1))
    assert (result.ran, result.skipped_done, result.failed) == (1, 1, 0)
    df = load_records(tmp_path / "run")
    slow = df[(df.measurement == "cell") & (df.variant == "slow@quantize")]
    assert slow.status.tolist() == ["ok"] and slow.attempt.tolist() == [2]
    calls = counter.read_text().splitlines()
    assert calls.count("ok@quantize") == 1 and calls.count("slow@quantize") == 3  # finished cell not recomputed


def _cell(**kw) -> CellSpec:
    base = dict(cell_id="c", suite="s", model="tiny:llama", backend="fp", variant="fp16", device="cuda",
                measurements=[], timeout_s=60)
    return CellSpec(**(base | kw))


def test_resources_follow_the_cell(harness_env):
    ex = RayExecutor(max_retries=3, cpus_per_cell=2)
    opts = ex.options(_cell(gpus=2, hardware="h100-sxm"))
    assert opts["num_gpus"] == 2 and opts["num_cpus"] == 2 and opts["max_retries"] == 3
    assert opts["resources"] == {"hw:h100-sxm": HW_SHARE} and opts["retry_exceptions"] is False
    assert ex.options(_cell(device="cpu", gpus=1))["num_gpus"] == 0
    # memory: the float32 model, twice when a measurement loads the reference model beside it
    # (outliers; divergence reads the stored reference), plus 1 GiB
    ref = {"backend": "fp", "variant_params": {}}
    alone = ex.estimate_memory(_cell(reference=ref, measurements=[{"name": "divergence"}]))
    paired = ex.estimate_memory(_cell(reference=ref, measurements=[{"name": "divergence"}, {"name": "outliers"}]))
    assert alone > 1024**3 and paired - 1024**3 == pytest.approx(2 * (alone - 1024**3), abs=2)
    assert RayExecutor(memory_per_cell=5e9).options(_cell())["memory"] == 5_000_000_000


def test_infeasible_cells_are_named():
    nodes = [{"CPU": 16.0, "GPU": 1.0, "memory": 1e11, "hw:h200": 1.0}]
    ok = {"num_cpus": 1, "num_gpus": 1, "memory": 1e9, "resources": {"hw:h200": HW_SHARE}}
    assert _infeasible(ok, nodes) is None
    reason = _infeasible({**ok, "num_gpus": 2, "resources": {"hw:h100-sxm": HW_SHARE}}, nodes)
    assert "GPU=2" in reason and "hw:h100-sxm" in reason and "hw:h200" in reason


def test_pinned_hardware_and_gpus_are_checked(tmp_path, harness_env, ray_session):
    body = tiny_suite(tmp_path / "s.yaml").read_text().replace("device: cpu", "device: cpu\nhardware: h100-sxm")
    suite = load_suite(str(write_suite(tmp_path / "pinned.yaml", body)))
    with pytest.raises(HarnessError, match="no node of the Ray cluster can run these cells: needs hw:h100-sxm"):
        run_suite(suite, out=tmp_path / "ray", executor=_executor(tmp_path))
    with pytest.raises(HarnessError, match="pins hardware 'h100-sxm' but this machine is"):
        run_suite(suite, out=tmp_path / "local", executor=LocalExecutor())
    typo = load_suite(str(write_suite(tmp_path / "typo.yaml", body.replace("h100-sxm", "h100-smx"))))
    with pytest.raises(HarnessError, match="suite 'tiny': unknown hardware profile 'h100-smx' .did you mean 'h100-sxm'"):
        run_suite(typo, out=tmp_path / "typo", executor=LocalExecutor())


@pytest.mark.gpu
def test_one_cell_spans_two_gpus(tmp_path, harness_env, ray_session):
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    body = tiny_suite(tmp_path / "s.yaml").read_text().replace("device: cpu", "device: cuda").replace(
        "variants: [{dtype: float32}]", "gpus: 2\n    variants: [{dtype: float32}]")
    run_suite(load_suite(str(write_suite(tmp_path / "two.yaml", body))), out=tmp_path / "run", executor=RayExecutor())
    cell = load_records(tmp_path / "run").query("measurement == 'cell'").iloc[0]
    assert cell.status == "ok", cell.error
    assert cell.provenance["gpus"] == 2 and cell.provenance["executor"]["gpus"] == 2
    # accelerate's balanced map may keep a model this small on the first GPU; every module is on a GPU
    assert cell.provenance["placement"]["gpus"] == 2
    assert set(cell.provenance["placement"]["modules_per_gpu"]) <= {"cuda:0", "cuda:1"}


def test_cli_options_are_checked(tmp_path, harness_env):
    from typer.testing import CliRunner

    from harness.cli.main import app

    suite = str(tiny_suite(tmp_path / "s.yaml"))
    result = CliRunner().invoke(app, ["run", "--suite", suite, "--address", "auto"])
    assert result.exit_code == 2 and "--address is for --executor ray" in result.output
    result = CliRunner().invoke(app, ["run", "--suite", suite, "--executor", "rey"])
    assert result.exit_code == 2 and "unknown executor 'rey'" in result.output and "ray" in result.output
