"""Where the Dask workers come from: a local cluster, a running scheduler, or SLURM jobs.

``open_client(cfg)`` is a context manager giving a ``distributed.Client``:

- ``cluster.scheduler`` set: connect to that scheduler (its workers are someone else's to stop);
- ``cluster.kind: local``: worker processes on this machine;
- ``cluster.kind: slurm``: a dask-jobqueue ``SLURMCluster`` built from ``cfg.slurm``; workers are
  started as batch jobs by adaptive scaling between ``slurm.jobs_min`` and ``slurm.jobs_max``.

Whatever happens (the cohort finishes, a slide raises, Ctrl-C, ``scancel`` of the driver job, a
``kill``), the jobs are cancelled: the cluster is closed in ``finally`` and, while the client is open,
SIGTERM raises ``SystemExit`` and SIGINT ``KeyboardInterrupt`` in the driver so that ``finally`` runs.
Only SIGKILL skips it; then the workers find their scheduler gone and exit after
``distributed.comm.timeouts.connect`` / the worker death timeout, and SLURM ends the jobs.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import dask
from distributed import Client, LocalCluster
from distributed.deploy.adaptive import Adaptive
from distributed.diagnostics.plugin import WorkerPlugin

from .config import RunConfig, SlurmOptions
from .errors import ConfigError

log = logging.getLogger(__name__)
GPU_RESOURCE = "GPU"  # the Dask resource GPU workers advertise; same name as inference.GPU_RESOURCE

# Typical task durations of the pipeline's tasks (keyed by the function name, Dask's task prefix).
# Without them the scheduler assumes 0.5 s for a task it has not seen yet, so adaptive scaling asks
# for too few jobs at the start of a cohort and waits until the first tasks have finished.
TASK_DURATIONS: dict[str, str] = {
    "read_tile": "1s",
    "post_process": "3s",
    "predict_tiles_on_worker": "20s",  # read + model on a batch of tiles
    "post_process_from_batch": "3s",
    "batch_seconds": "1ms",
    "write_label_shard": "1s",
    "write_rgb_core": "1s",
    "downsample_shard_after": "500ms",
    "write_tile_vectors": "500ms",
}


def walltime_seconds(walltime: str) -> int:
    """SLURM's walltime forms (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) in seconds."""
    text = walltime.strip()
    days = 0
    if "-" in text:
        day_text, text = text.split("-", 1)
        days = int(day_text)
        parts = [int(p) for p in text.split(":")]
        hours, minutes, seconds = (parts + [0, 0])[:3]
    else:
        parts = [int(p) for p in text.split(":")]
        if len(parts) == 1:
            hours, minutes, seconds = 0, parts[0], 0
        elif len(parts) == 2:
            hours, (minutes, seconds) = 0, parts
        else:
            hours, minutes, seconds = parts
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def worker_lifetime_args(walltime: str) -> list[str]:
    """Workers leave 5 minutes before their job's walltime (staggered), so adaptive scaling replaces
    them cleanly instead of SLURM killing them mid-task; nothing for walltimes of 10 minutes or less."""
    seconds = walltime_seconds(walltime)
    if seconds <= 600:
        return []
    return ["--lifetime", f"{seconds - 300}s", "--lifetime-stagger", "60s"]


def gpu_for_worker(worker_name: str, visible: str | None, processes: int) -> str | None:
    """The one GPU a worker process of a multi-GPU job should see.

    dask-jobqueue names the worker processes of one job ``<job>-0`` .. ``<job>-<n-1>``; SLURM's
    ``CUDA_VISIBLE_DEVICES`` lists the job's GPUs. Worker ``i`` gets the ``i``-th of them, so the
    processes do not all pile onto the first GPU. None: nothing to change.
    """
    if not visible or processes <= 1:
        return None
    devices = [d for d in visible.split(",") if d.strip()]
    match = re.search(r"-(\d+)$", worker_name)
    if match is None or len(devices) < processes:
        return None
    return devices[int(match.group(1)) % len(devices)]


class PinGpu(WorkerPlugin):
    """Sets ``CUDA_VISIBLE_DEVICES`` of each worker process to its own GPU before CUDA starts there."""

    name = "wsi-grunet-pin-gpu"

    def __init__(self, processes: int) -> None:
        self.processes = processes

    def setup(self, worker: Any) -> None:
        device = gpu_for_worker(str(worker.name), os.environ.get("CUDA_VISIBLE_DEVICES"), self.processes)
        if device is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = device


def slurm_cluster_kwargs(options: SlurmOptions, python: str | None = None) -> dict[str, Any]:
    """The ``SLURMCluster`` arguments for ``cfg.slurm`` (pure: nothing is submitted)."""
    directives = list(options.job_extra_directives)
    worker_args = worker_lifetime_args(options.walltime)
    processes = options.processes
    if options.gpus_per_job > 0:
        # One worker process per GPU, each advertising GPU=1: the model tasks (resources={"GPU": 1}) go
        # only to them, one at a time per GPU, while reads, post-processing and writes run on any worker.
        directives.append(f"--gres=gpu:{options.gpus_per_job}")
        processes = options.gpus_per_job
        if processes > options.cores:
            raise ConfigError(
                f"slurm.gpus_per_job: {options.gpus_per_job} needs at least as many slurm.cores "
                f"(one worker process per GPU), not {options.cores}"
            )
        worker_args += ["--resources", f"{GPU_RESOURCE}=1"]
    kwargs: dict[str, Any] = {
        "cores": options.cores,
        "memory": options.memory,
        "processes": processes,
        "walltime": options.walltime,
        "job_script_prologue": list(options.prologue),
        "job_extra_directives": directives,
        "worker_extra_args": worker_args,
        "python": options.python or python or sys.executable,
    }
    for key, value in (
        ("queue", options.partition),
        ("account", options.account),
        ("log_directory", options.log_directory),
        ("local_directory", options.local_directory),
    ):
        if value is not None:
            kwargs[key] = value
    return kwargs


class KeepBusyAdaptive(Adaptive):
    """Adaptive scaling that never retires a job whose workers are running tasks.

    The scheduler's choice of workers to close prefers idle ones but, when the target drops (the
    queue looks short because it was estimated from few durations), it can pick a worker in the
    middle of a model batch; its tasks then start again elsewhere and the model is loaded again.
    So: candidates with tasks in progress (any worker of the same job) are dropped from the list, and
    ``wait_count`` makes a worker wait through several consecutive recommendations before it goes
    (an idle GPU worker between two slides keeps its loaded model).
    """

    async def workers_to_close(self, target: int) -> list[str]:
        names = await super().workers_to_close(target)
        scheduler = getattr(self.cluster, "scheduler", None)
        workers = getattr(scheduler, "workers", None)
        if not names or not isinstance(workers, dict):
            return names
        job_of = _job_names(self.cluster)
        busy_jobs = {job_of.get(str(ws.name), str(ws.name)) for ws in workers.values() if ws.processing}
        return [n for n in names if job_of.get(str(n), str(n)) not in busy_jobs]


def _job_names(cluster: Any) -> dict[str, str]:
    """Worker name -> the job (worker spec) it belongs to; multi-process jobs are groups."""
    mapping: dict[str, str] = {}
    for name, spec in getattr(cluster, "worker_spec", {}).items():
        for suffix in spec.get("group", [""]):
            mapping[str(name) + suffix] = str(name)
    return mapping


def make_slurm_cluster(cfg: RunConfig) -> Any:
    """A started ``SLURMCluster`` (scheduler in this process) with adaptive scaling; jobs come as work does."""
    import shutil

    from dask_jobqueue import SLURMCluster

    if shutil.which("sbatch") is None:
        raise ConfigError(
            "cluster.kind: slurm needs the SLURM commands (sbatch, squeue, scancel) on PATH; "
            "they were not found on this machine"
        )
    options = cfg.slurm
    if options.log_directory:
        os.makedirs(options.log_directory, exist_ok=True)
    kwargs = slurm_cluster_kwargs(options)
    cluster = SLURMCluster(dashboard_address=None, **kwargs)
    # wait_count x interval: a worker recommended for closing 10 times in a row (20 s) goes; the
    # minimum of jobs_min stays. Busy jobs are never closed (KeepBusyAdaptive).
    cluster.adapt(
        minimum_jobs=options.jobs_min,
        maximum_jobs=options.jobs_max,
        interval="2s",
        wait_count=10,
        target_duration="10s",
        Adaptive=KeepBusyAdaptive,
    )
    log.info("SLURM jobs: %s", " ".join(cluster.job_header.split()))
    return cluster


LOOPBACK = "127.0.0.1"


def make_local_cluster(cfg: RunConfig) -> LocalCluster:
    """Worker processes on this machine; the scheduler, its dashboard and the workers listen on loopback.

    Task names carry slide file names, often patient identifiers, and the dashboard also shows worker
    logs and call stacks: nobody else on the network should reach them. To watch a run from another
    machine, forward the dashboard's port over SSH (``ssh -L``).
    """
    return LocalCluster(
        n_workers=cfg.cluster.workers,
        threads_per_worker=cfg.cluster.threads_per_worker,
        processes=True,
        host=LOOPBACK,  # scheduler, nannies and workers
        dashboard_address=f"{LOOPBACK}:0",  # the dashboard binds on its own, to every interface unless told
    )


class _Interrupted:
    """SIGTERM -> ``SystemExit(143)``, SIGINT -> ``KeyboardInterrupt`` while the client is open (main
    thread only: Python delivers signals there); the previous handlers come back afterwards."""

    def __init__(self) -> None:
        self.previous: dict[int, Any] = {}

    @staticmethod
    def _terminate(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    @staticmethod
    def _interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    def __enter__(self) -> _Interrupted:  # noqa: PYI034
        import threading

        if threading.current_thread() is threading.main_thread():
            self.previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._terminate)
            self.previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._interrupt)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


@contextmanager
def open_client(cfg: RunConfig) -> Iterator[Client]:
    """A Dask client for ``cfg.cluster``; the cluster this opened (and its SLURM jobs) is closed on exit."""
    # The scheduler (in this process for local and SLURM clusters) reads the default durations when it
    # first sees a task name, so they stay set while the client is open.
    with _Interrupted(), dask.config.set({"distributed.scheduler.default-task-durations": TASK_DURATIONS}):
        cluster: Any = None
        client: Client | None = None
        try:
            if cfg.cluster.scheduler:
                client = Client(cfg.cluster.scheduler)
            elif cfg.cluster.kind == "slurm":
                cluster = make_slurm_cluster(cfg)
                client = Client(cluster)
                if cfg.slurm.gpus_per_job > 1:
                    client.register_plugin(PinGpu(cfg.slurm.gpus_per_job))
            else:
                cluster = make_local_cluster(cfg)
                client = Client(cluster)
            yield client
        finally:
            # Signals arriving now must not cut the clean-up short: ignore them until the jobs are gone.
            held = (
                {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGTERM, signal.SIGINT)}
                if _in_main_thread()
                else {}
            )
            try:
                if client is not None:
                    client.close()
                if cluster is not None:
                    cluster.close()  # SLURMCluster: scancel of every job it submitted
            finally:
                for signum, handler in held.items():
                    signal.signal(signum, handler)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
