"""The workflow recipes in workflows/ against the local SLURM: a job array (sbatch --wait) and Snakemake
with its SLURM executor; their results equal a local run of the same slides."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
from slurm_support import (
    REPO_ROOT,
    assert_same_results,
    ledger,
    require_slurm,
    temporary_folders,
    unique_job_name,
    wait_for_no_jobs,
)

WORKFLOWS = REPO_ROOT / "workflows"
pytestmark = pytest.mark.slow


def test_make_slide_list_finds_the_slides(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ("a/x.svs", "b.TIFF", ".hidden.svs", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    out = subprocess.run(
        [WORKFLOWS / "slurm-array" / "make-slide-list", tmp_path], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out == sorted([str((tmp_path / "a" / "x.svs").resolve()), str((tmp_path / "b.TIFF").resolve())])


def test_job_array_equals_local_run(slurm_cohort, tmp_path):
    require_slurm()
    root, names, args = slurm_cohort
    listing = subprocess.run(
        [WORKFLOWS / "slurm-array" / "make-slide-list", root / "slides"], capture_output=True, text=True, check=True
    ).stdout
    (tmp_path / "slides.txt").write_text(listing)
    count = len(listing.splitlines())
    assert count == len(names) + 1
    out, job = tmp_path / "out", unique_job_name()
    # the node of the test SLURM is small: override the script's resource lines on the command line
    submit = [
        "sbatch",
        "--wait",
        f"--job-name={job}",
        f"--array=1-{count}",
        "--cpus-per-task=1",
        "--mem=2G",
        f"--output={tmp_path}/array-%A_%a.out",
        str(WORKFLOWS / "slurm-array" / "segment_array.sbatch"),
        str(tmp_path / "slides.txt"),
        str(out),
        *map(str, args),
    ]
    env = {**os.environ, "WSI_GRUNET": f"{sys.executable} -m wsi_grunet.cli"}
    done = subprocess.run(submit, capture_output=True, text=True, timeout=600, env=env)
    logs = "\n".join(p.read_text() for p in sorted(tmp_path.glob("array-*.out")))
    assert done.returncode == 1, done.stdout + done.stderr + logs  # the highest task exit code: the bad slide
    assert len(list(tmp_path.glob("array-*.out"))) == count
    assert wait_for_no_jobs(job) == []
    assert assert_same_results(root / "local", out, names) > 100
    rows = ledger(out)
    assert {n: rows[n]["status"] for n in rows} == {**{n: "ok" for n in names}, "broken": "failed"}
    assert temporary_folders(out) == []


def test_snakemake_with_the_slurm_executor_equals_local_run(slurm_cohort, tmp_path):
    require_slurm()
    if shutil.which("snakemake") is None and not (REPO_ROOT / ".venv" / "bin" / "snakemake").exists():
        pytest.skip("snakemake is not installed (pip install -e '.[test]')")
    root, names, args = slurm_cohort
    slides = tmp_path / "slides"  # the good slides only, so the cohort rule runs too
    slides.mkdir()
    for name in names:
        (slides / f"{name}.svs").symlink_to(root / "slides" / f"{name}.svs")
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "snakemake",
        "-s",
        str(WORKFLOWS / "snakemake" / "Snakefile"),
        "--profile",
        str(WORKFLOWS / "snakemake" / "profile"),
        "--directory",
        str(tmp_path / "work"),
        "--config",
        f"slides={slides}",
        f"out={out}",
        f"args={shlex.join(map(str, args))} ",
        f"wsi_grunet={sys.executable} -m wsi_grunet.cli",
        f"python={sys.executable}",
        # the test SLURM: one small node, no accounting, no GPUs
        "--jobs",
        "2",
        "--latency-wait",
        "5",
        "--retries",
        "0",
        "--slurm-status-command",
        "squeue",
        "--slurm-init-seconds-before-status-checks",
        "1",
        "--default-resources",
        "slurm_partition=debug",
        "mem_mb=1500",
        "runtime=10",
        "slurm_account=none",
        "--set-resources",
        "slide:slurm_partition=debug",
        "slide:gpu=0",
        "slide:cpus_per_task=1",
        "slide:mem_mb=2000",
        "cohort:slurm_partition=debug",
        "cohort:cpus_per_task=1",
        "--set-threads",
        "slide=1",
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-6000:]
    submitted = set(re.findall(r"SLURM jobid (\d+)", done.stdout + done.stderr))
    assert len(submitted) == len(names) + 1, done.stderr[-3000:]  # a job per slide and the cohort job
    assert wait_for_no_jobs(ids=submitted) == []
    # links to the same slide files: same fingerprints, same everything
    assert assert_same_results(root / "local", out, names) > 100
    rows = ledger(out)
    assert sorted(rows) == sorted(names) and {r["status"] for r in rows.values()} == {"ok"}
    assert temporary_folders(out) == []
