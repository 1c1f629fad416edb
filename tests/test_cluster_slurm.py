"""A cohort with Dask workers in real SLURM jobs (the local SLURM of .ci/setup.d/20-slurm.sh).

Also without SLURM: the job script dask-jobqueue would submit for the configuration (GPU directives,
resources, prologue), the walltime arithmetic, and the GPU a worker process of a multi-GPU job takes.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from slurm_support import (
    assert_same_results,
    ledger,
    our_jobs,
    popen_cli,
    require_slurm,
    temporary_folders,
    unique_job_name,
    wait_for_no_jobs,
)

from wsi_grunet.cluster import gpu_for_worker, slurm_cluster_kwargs, walltime_seconds, worker_lifetime_args
from wsi_grunet.config import load_config


def _slurm_cfg(**slurm):
    return load_config(None, [{"cluster": {"kind": "slurm"}, "slurm": slurm}])


def test_slurm_job_script_for_gpu_jobs(tmp_path):
    from dask_jobqueue import SLURMCluster

    cfg = _slurm_cfg(
        partition="gpu",
        account="lab",
        walltime="02:00:00",
        cores=8,
        memory="32GB",
        gpus_per_job=2,
        prologue=["module load cuda/12", "source /opt/venv/bin/activate"],
        job_extra_directives=["--qos=long"],
        log_directory=str(tmp_path / "logs"),
        local_directory="/scratch",
        python="/opt/venv/bin/python",
    )
    kwargs = slurm_cluster_kwargs(cfg.slurm)
    assert kwargs["processes"] == 2  # one worker process per GPU
    with SLURMCluster(dashboard_address=None, **kwargs) as cluster:
        script = cluster.job_script()
    lines = script.splitlines()
    for directive in (
        "#SBATCH -p gpu",
        "#SBATCH -A lab",
        "#SBATCH -t 02:00:00",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --qos=long",
        "#SBATCH --gres=gpu:2",
    ):
        assert directive in lines, (directive, script)
    assert lines.index("module load cuda/12") < lines.index("source /opt/venv/bin/activate")
    worker = next(line for line in lines if "distributed.cli.dask_worker" in line)
    assert worker.startswith("/opt/venv/bin/python -m distributed.cli.dask_worker")
    for part in (
        "--nworkers 2",
        "--nthreads 4",
        "--resources GPU=1",
        "--local-directory /scratch",
        "--lifetime 6900s",
        "--lifetime-stagger 60s",
    ):
        assert part in worker, (part, worker)


def test_cpu_jobs_have_no_gpu_lines():
    kwargs = slurm_cluster_kwargs(_slurm_cfg(cores=4, processes=2, walltime="10").slurm)
    assert kwargs["processes"] == 2 and kwargs["job_extra_directives"] == [] and kwargs["worker_extra_args"] == []
    assert "queue" not in kwargs and "account" not in kwargs


def test_gpus_need_a_core_each():
    from wsi_grunet.errors import ConfigError

    with pytest.raises(ConfigError, match="slurm.gpus_per_job: 4 needs at least as many slurm.cores"):
        slurm_cluster_kwargs(_slurm_cfg(cores=2, gpus_per_job=4).slurm)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30", 1800), ("5:30", 330), ("01:00:00", 3600), ("1-12", 129600), ("2-00:30", 174600), ("0-01:02:03", 3723)],
)
def test_walltime_seconds(text, seconds):
    assert walltime_seconds(text) == seconds


def test_short_walltimes_get_no_lifetime():
    assert worker_lifetime_args("00:10:00") == []
    assert worker_lifetime_args("00:20:00") == ["--lifetime", "900s", "--lifetime-stagger", "60s"]


def test_each_worker_of_a_gpu_job_gets_its_own_gpu():
    assert [gpu_for_worker(f"SLURMCluster-3-{i}", "4,5", 2) for i in range(2)] == ["4", "5"]
    assert gpu_for_worker("SLURMCluster-3", "4", 1) is None  # one process: it sees its GPU already
    assert gpu_for_worker("SLURMCluster-3-1", None, 2) is None  # no GPUs given by SLURM


SLURM_SETTINGS = [
    "slurm.cores=1",
    "slurm.memory=2GB",
    "slurm.processes=1",
    "slurm.jobs_max=2",
    "slurm.walltime=00:10:00",
]


@pytest.mark.slow
def test_cohort_on_slurm_workers_equals_local_run(slurm_cohort, tmp_path):
    require_slurm()
    root, names, args = slurm_cohort
    out, job = tmp_path / "out", unique_job_name()
    run = popen_cli(
        root / "slides",
        "--out",
        out,
        "--cluster",
        "slurm",
        *args,
        f"slurm.log_directory={tmp_path / 'logs'}",
        f"slurm.job_extra_directives=--job-name={job}",  # later than dask-jobqueue's -J: this name wins
        *SLURM_SETTINGS,
        log=tmp_path / "run.log",
    )
    seen: set[str] = set()
    try:
        while run.poll() is None:
            seen |= {job_id for job_id, _, state in our_jobs(job) if state == "RUNNING"}
            time.sleep(0.5)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    text = (tmp_path / "run.log").read_text()
    assert run.wait() == 1, text  # the bad slide failed, the others did not
    assert seen, "no worker job was seen running"  # the workers ran as SLURM jobs
    assert wait_for_no_jobs(job) == []  # and were cancelled at the end
    job_logs = sorted((tmp_path / "logs").glob("*.err"))
    assert {p.name.split("-")[-1].split(".")[0] for p in job_logs} >= seen
    assert "broken.svs" in text and ledger(out)["broken"]["status"] == "failed"
    assert assert_same_results(root / "local", out, names) > 100
    assert temporary_folders(out) == []


@pytest.mark.slow
def test_sigterm_to_the_driver_cancels_its_jobs(slurm_cohort, tmp_path):
    require_slurm()
    root, names, args = slurm_cohort
    out, job = tmp_path / "out", unique_job_name()
    run = popen_cli(
        root / "slides",
        "--out",
        out,
        "--cluster",
        "slurm",
        *args,
        *SLURM_SETTINGS,
        f"slurm.log_directory={tmp_path / 'logs'}",
        f"slurm.job_extra_directives=--job-name={job}",
        log=tmp_path / "run.log",
    )
    try:
        deadline = time.monotonic() + 180
        while run.poll() is None and not any(s == "RUNNING" for *_, s in our_jobs(job)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert run.poll() is None, (tmp_path / "run.log").read_text()
        assert any(s == "RUNNING" for *_, s in our_jobs(job)), "no worker job started"
        run.send_signal(signal.SIGTERM)  # what scancel of the driver's job sends first
        code = run.wait(120)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert code == 128 + signal.SIGTERM, (tmp_path / "run.log").read_text()
    assert wait_for_no_jobs(job) == []
    assert temporary_folders(out) == []  # the interrupted slide's folder was removed
    assert not any((out / n / "report.json").exists() for n in names[1:])


def read_tile(x: int) -> int:  # named like the pipeline's read task
    return x + 1


def test_scheduler_knows_the_pipeline_task_durations():
    """Unknown durations would make adaptive scaling wait for the first tasks before asking for jobs."""
    from wsi_grunet.cluster import open_client

    cfg = load_config(None, [{"cluster": {"workers": 1}}])
    with open_client(cfg) as client:

        def first_guess(dask_scheduler, name):  # what the scheduler assumes for a task name it sees first
            from distributed.scheduler import TaskPrefix

            return TaskPrefix(name).duration_average

        assert client.run_on_scheduler(first_guess, name="read_tile") == 1.0
        assert client.run_on_scheduler(first_guess, name="predict_tiles_on_worker") == 20.0
        assert client.run_on_scheduler(first_guess, name="something_else") == -1  # unknown: the global default
        assert client.submit(read_tile, 1).result() == 2
    assert client.status == "closed"


def test_task_durations_name_the_functions_the_pipeline_submits():
    """Dask keys durations by function name: a renamed task would silently lose its estimate."""
    import wsi_grunet.inference
    import wsi_grunet.label_image
    import wsi_grunet.outputs.zarr_store
    import wsi_grunet.tile_work
    from wsi_grunet.cluster import TASK_DURATIONS

    modules = (wsi_grunet.inference, wsi_grunet.label_image, wsi_grunet.outputs.zarr_store, wsi_grunet.tile_work)
    defined = {name for module in modules for name, value in vars(module).items() if callable(value)}
    assert set(TASK_DURATIONS) <= defined, sorted(set(TASK_DURATIONS) - defined)
