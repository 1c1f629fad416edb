"""A cohort killed mid-run resumes to the same results; two runs on one output folder share the slides."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest
from slurm_support import (
    assert_same_results,
    ledger,
    popen_cli,
    run_cli,
    temporary_folders,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cohort(slurm_cohort):
    """Two slides and a bad one (in this order: broken, slide0, slide1) with a local reference run; the
    runs here use the same local cluster settings."""
    root, names, args = slurm_cohort
    return root, names, [*args[:2], "--workers", "1", *args[2:]]


def _statuses(text: str) -> dict[str, str]:
    """slide stem -> status, from the summary a run prints."""
    return {Path(m.group(2)).stem: m.group(1) for m in re.finditer(r"^  (ok|skipped|failed|busy)\s+(\S+)", text, re.M)}


def _recorded(out: Path, name: str) -> bool:
    """The slide's results are in place and the ledger records it (cohort.csv is replaced atomically)."""
    if not (out / name / "report.json").exists() or not (out / "cohort.csv").exists():
        return False
    return name in ledger(out)


def test_killed_run_resumes_to_the_uninterrupted_result(cohort, tmp_path):
    root, names, args = cohort
    out = tmp_path / "out"
    run = popen_cli(root / "slides", "--out", out, *args, log=tmp_path / "killed.log")
    try:
        deadline = time.monotonic() + 300
        # A slide is finished once its folder is in place and then its row is in the ledger (in that order,
        # so a kill between the two leaves a complete folder the next run skips): wait for both.
        while not _recorded(out, names[0]) and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert run.poll() is None, "ended before the kill:\n" + (tmp_path / "killed.log").read_text()
        finished_at_kill = [n for n in names if (out / n / "report.json").exists()]
        os.killpg(run.pid, signal.SIGKILL)  # the driver and its local workers, as a node failure would
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
        run.wait(60)
    assert names[0] in finished_at_kill and len(finished_at_kill) < len(names)
    assert ledger(out)[names[0]]["status"] == "ok"

    again = run_cli(root / "slides", "--out", out, *args)
    assert again.returncode == 1, again.stdout + again.stderr  # the bad slide, again
    statuses = _statuses(again.stdout)
    assert {n: statuses[n] for n in finished_at_kill} == {n: "skipped" for n in finished_at_kill}
    assert all(statuses[n] == "ok" for n in names if n not in finished_at_kill)
    assert assert_same_results(root / "local", out, names) > 100
    assert temporary_folders(out) == []
    rows = ledger(out)
    assert {n: r["status"] for n, r in rows.items()} == {**{n: "ok" for n in names}, "broken": "failed"}
    reference_rows = ledger(root / "local")
    assert [rows[n]["fingerprint"] for n in names] == [reference_rows[n]["fingerprint"] for n in names]
    assert [rows[n]["nuclei"] for n in names] == [reference_rows[n]["nuclei"] for n in names]


def test_a_changed_setting_redoes_finished_slides(cohort, tmp_path):
    root, names, args = cohort
    out = tmp_path / "out"
    first = run_cli(root / "slides" / "slide0.svs", "--out", out, *args)
    assert first.returncode == 0, first.stderr
    fingerprint = ledger(out)["slide0"]["fingerprint"]
    same = run_cli(root / "slides" / "slide0.svs", "--out", out, *args, "model.batch_size=2")  # speed only
    assert _statuses(same.stdout) == {"slide0": "skipped"}
    changed = run_cli(root / "slides" / "slide0.svs", "--out", out, *args, "output.preview_max_px=1024")
    assert _statuses(changed.stdout) == {"slide0": "ok"}
    assert ledger(out)["slide0"]["fingerprint"] != fingerprint


def test_concurrent_runs_share_the_slides(cohort, tmp_path):
    root, names, args = cohort
    out = tmp_path / "out"
    runs = [popen_cli(root / "slides", "--out", out, *args, log=tmp_path / f"run{k}.log") for k in range(2)]
    try:
        codes = [run.wait(600) for run in runs]
    finally:
        for run in runs:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
    logs = [(tmp_path / f"run{k}.log").read_text() for k in range(2)]
    statuses = [_statuses(text) for text in logs]
    # The bad slide fails in every run that tries it; a run that finds it locked by the other reports it busy.
    assert sorted(s["broken"] for s in statuses) in (["failed", "failed"], ["busy", "failed"]), "\n".join(logs)
    assert codes == [1 if s["broken"] == "failed" else 0 for s in statuses], "\n".join(logs)
    for name in names:
        seen = sorted(s[name] for s in statuses)
        # each slide written by exactly one run; the other found it locked (busy) or finished (skipped)
        assert seen in (["busy", "ok"], ["ok", "skipped"]), (name, seen)
    assert assert_same_results(root / "local", out, names) > 100
    assert temporary_folders(out) == []
    assert {n: r["status"] for n, r in ledger(out).items()} == {**{n: "ok" for n in names}, "broken": "failed"}
