"""Shared pieces of the cohort tests: the local SLURM's state, a small cohort, CLI runs, result comparison.

The SLURM tests use the real single-node SLURM that ``.ci/setup.d/20-slurm.sh`` starts; without it
(no ``sinfo``, or the node not up) they skip with the reason.
"""

from __future__ import annotations

import getpass
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from synthetic import write_synthetic_slide

REPO_ROOT = Path(__file__).resolve().parent.parent
WSI_GRUNET = [sys.executable, "-m", "wsi_grunet.cli"]
# Files whose bytes depend on when and how a run went: report.json holds timings, the resolved config
# (cluster.kind, output paths) and software versions; its counts and fingerprint are compared instead.
# nuclei.geojson.gz: the gzip header holds the time it was written, so its decompressed text is compared.
NOT_BYTE_IDENTICAL = {"report.json"}
# A few-tile untrained model on 256-pixel tiles: fast on a loaded CPU. Its probabilities sit just below
# 0.5, so a threshold of 0.485 gives a few hundred deterministic blobs per slide to compare.
RUN_SETTINGS = [
    "--device",
    "cpu",
    "--no-tissue-detection",
    "--quiet",
    "--set",
    "tiling.tile_size=256",
    "tiling.halo=64",
    "output.chunk=128",
    "model.tta=none",
    "model.threads=1",
    "postprocess.threshold=0.485",
    "cluster.threads_per_worker=1",
]


def slurm_problem() -> str | None:
    """Why the SLURM tests cannot run here, or None when the local SLURM node is up."""
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "SLURM commands (sinfo, sbatch) are not installed; .ci/setup.d/20-slurm.sh sets up a local SLURM"
    try:
        state = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 20 s: slurmctld is not running"
    states = state.stdout.split()
    if state.returncode != 0 or not any(s.rstrip("*") in ("idle", "mix", "alloc") for s in states):
        return f"no SLURM node is up (sinfo: {state.stdout.strip() or state.stderr.strip()!r})"
    return None


def require_slurm() -> None:
    problem = slurm_problem()
    if problem is not None:
        pytest.skip(problem)


def our_jobs(name: str | None = None, ids: set[str] | None = None) -> list[tuple[str, str, str]]:
    """(job id, name, state) of this user's jobs in squeue, optionally only those with this job name or
    these ids (other tests or people may use the same SLURM at the same time)."""
    out = subprocess.run(
        ["squeue", "-h", "-u", getpass.getuser(), "-o", "%i %j %T"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    jobs = [tuple(line.split(None, 2)) for line in out.splitlines() if line.strip()]
    return [j for j in jobs if (name is None or j[1] == name) and (ids is None or j[0].split("_")[0] in ids)]  # type: ignore[misc]


def wait_for_no_jobs(name: str | None = None, ids: set[str] | None = None, deadline_s: float = 60.0) -> list:
    """Poll squeue until no such job is left (cancelled jobs linger briefly while completing)."""
    end = time.monotonic() + deadline_s
    jobs = our_jobs(name, ids)
    while jobs and time.monotonic() < end:
        time.sleep(0.5)
        jobs = our_jobs(name, ids)
    return jobs


def unique_job_name() -> str:
    return f"wsi-test-{uuid.uuid4().hex[:10]}"


def make_cohort(folder: Path, count: int = 2, bad: bool = True) -> list[str]:
    """``count`` small synthetic slides (2 tiles of 256 px each at 0.5 um/px) plus, with ``bad``, a file
    that is not a slide. Returns the output names of the good slides."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for k in range(count):
        write_synthetic_slide(folder / f"slide{k}.svs", 256, 128, mpp=0.5, levels=1, seed=11 + k)
        names.append(f"slide{k}")
    if bad:
        (folder / "broken.svs").write_bytes(b"this is not a slide\n" * 64)
    return names


def run_cli(*args: str | Path, timeout: float = 600, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*WSI_GRUNET, "run", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=REPO_ROOT,
    )


def popen_cli(*args: str | Path, log: Path) -> subprocess.Popen:
    """A run in its own session (so a kill of its process group takes its local workers too)."""
    handle = open(log, "w")  # noqa: SIM115 - closed by the caller's wait through the process
    return subprocess.Popen(
        [*WSI_GRUNET, "run", *map(str, args)],
        stdout=handle,
        stderr=subprocess.STDOUT,
        cwd=REPO_ROOT,
        start_new_session=True,
    )


def file_digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under a slide's result folder (GeoJSON also by its decompressed text)."""
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = str(path.relative_to(folder))
        if rel in NOT_BYTE_IDENTICAL:
            continue
        if rel.endswith(".gz"):
            with gzip.open(path, "rb") as handle:
                out[rel + ":decompressed"] = hashlib.sha256(handle.read()).hexdigest()
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def features(folder: Path) -> list[dict]:
    with gzip.open(folder / "nuclei.geojson.gz", "rt") as handle:
        return json.load(handle)["features"]


def report(folder: Path) -> dict:
    return json.loads((folder / "report.json").read_text())


def assert_same_results(a: Path, b: Path, names: list[str], same_slide_files: bool = True) -> int:
    """Same nuclei, ids, GeoJSON content and file bytes (report.json aside) in two output roots;
    returns the total of nuclei. ``same_slide_files``: the runs read the same files, so the
    fingerprints (which include the slide's path) agree too."""
    total = 0
    for name in names:
        ra, rb = report(a / name), report(b / name)
        assert ra["status"] == rb["status"] == "ok", name
        assert ra["counts"] == rb["counts"], name
        assert (ra["fingerprint"] == rb["fingerprint"]) is same_slide_files, name
        fa, fb = features(a / name), features(b / name)
        assert [f["id"] for f in fa] == [f["id"] for f in fb], name
        assert fa == fb, name
        assert file_digests(a / name) == file_digests(b / name), name
        total += ra["counts"]["nuclei"]
    return total


def temporary_folders(out: Path) -> list[Path]:
    """Unfinished writers' folders (``.<name>.partial-*``, ``.<name>.old-*``) anywhere under ``out``."""
    return sorted(p for p in out.rglob(".*") if p.is_dir() and (".partial-" in p.name or ".old-" in p.name))


def ledger(out: Path) -> dict[str, dict[str, str]]:
    import csv

    with open(out / "cohort.csv", newline="") as handle:
        return {row["name"]: row for row in csv.DictReader(handle)}
