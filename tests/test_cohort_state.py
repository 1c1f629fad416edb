"""Cohort state: result fingerprints, slide locks that die with their holder, stale folders, the ledger."""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from wsi_grunet import cohort_state as cs
from wsi_grunet.config import load_config


def _slide(tmp_path: Path, name: str = "a.svs", data: bytes = b"pixels") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_fingerprint_changes_with_what_changes_results(tmp_path):
    slide = _slide(tmp_path)
    base = cs.slide_fingerprint(slide, load_config(), "w1")
    assert base == cs.slide_fingerprint(slide, load_config(), "w1")
    assert len(base) == 64 and int(base, 16) >= 0
    changed = {
        "weights": cs.slide_fingerprint(slide, load_config(), "w2"),
        "tile size": cs.slide_fingerprint(slide, load_config(None, [{"tiling": {"tile_size": 768}}]), "w1"),
        "threshold": cs.slide_fingerprint(slide, load_config(None, [{"postprocess": {"threshold": 0.6}}]), "w1"),
        "tta": cs.slide_fingerprint(slide, load_config(None, [{"model": {"tta": "flips"}}]), "w1"),
        "mpp": cs.slide_fingerprint(slide, load_config(None, [{"slide": {"mpp": 0.25}}]), "w1"),
        "tissue": cs.slide_fingerprint(slide, load_config(None, [{"tissue": {"enabled": False}}]), "w1"),
        "formats": cs.slide_fingerprint(slide, load_config(None, [{"output": {"formats": ["geojson"]}}]), "w1"),
        "chunk": cs.slide_fingerprint(slide, load_config(None, [{"output": {"chunk": 128}}]), "w1"),
        "relief levels": cs.slide_fingerprint(slide, load_config(None, [{"postprocess": {"relief_levels": 3}}]), "w1"),
        # The same tensors with post-processing tuned again (stored beside the weights)
        "weights' tuning": cs.slide_fingerprint(slide, load_config(), "w1", {"relief_levels": 3.0}),
    }
    for what, value in changed.items():
        assert value != base, what


def test_fingerprint_ignores_speed_settings_and_format_order(tmp_path):
    slide = _slide(tmp_path)
    base = cs.slide_fingerprint(slide, load_config(), "w1")
    same = [
        {"model": {"device": "cpu", "batch_size": 1, "threads": 1, "channels_last": False}},
        {"cluster": {"workers": 7, "tiles_in_flight": 3}},
        {"output": {"overwrite": True}},
        {"slurm": {"jobs_max": 9}},
        {"output": {"formats": ["preview", "parquet", "geojson", "zarr"]}},
        {"output": {"chunk": 448}},  # what auto resolves to for the default tiles: the same store
    ]
    for override in same:
        assert cs.slide_fingerprint(slide, load_config(None, [override]), "w1") == base, override


def test_fingerprint_follows_the_slide_file(tmp_path):
    slide = _slide(tmp_path)
    cfg = load_config()
    base = cs.slide_fingerprint(slide, cfg, "w")
    os.utime(slide, ns=(slide.stat().st_atime_ns, slide.stat().st_mtime_ns + 1_000_000_000))
    touched = cs.slide_fingerprint(slide, cfg, "w")
    assert touched != base
    slide.write_bytes(b"other pixels!")
    assert cs.slide_fingerprint(slide, cfg, "w") != touched
    copy = _slide(tmp_path, "b.svs", slide.read_bytes())
    os.utime(copy, ns=(slide.stat().st_atime_ns, slide.stat().st_mtime_ns))
    assert cs.slide_fingerprint(copy, cfg, "w") != cs.slide_fingerprint(slide, cfg, "w")  # another path


def test_fingerprint_of_a_series_folder_sees_each_file(tmp_path):
    series = tmp_path / "series"
    series.mkdir()
    (series / "1.dcm").write_bytes(b"a")
    (series / "2.dcm").write_bytes(b"b")
    cfg = load_config()
    base = cs.slide_fingerprint(series, cfg, "w")
    (series / "2.dcm").write_bytes(b"bb")
    assert cs.slide_fingerprint(series, cfg, "w") != base


def test_finished_report_needs_ok_and_the_same_fingerprint(tmp_path):
    out = tmp_path / "x"
    out.mkdir()
    assert cs.finished_report(out, "f") is None
    (out / "report.json").write_text("{not json")
    assert cs.finished_report(out, "f") is None
    (out / "report.json").write_text(json.dumps({"status": "failed", "fingerprint": "f"}))
    assert cs.finished_report(out, "f") is None
    (out / "report.json").write_text(json.dumps({"status": "ok", "fingerprint": "g"}))
    assert cs.finished_report(out, "f") is None
    (out / "report.json").write_text(json.dumps({"status": "ok", "fingerprint": "f", "name": "x"}))
    assert cs.finished_report(out, "f") == {"status": "ok", "fingerprint": "f", "name": "x"}


def test_lock_is_exclusive_and_released(tmp_path):
    first = cs.try_lock_slide(tmp_path, "a/b")
    assert first is not None and first.held
    assert cs.lock_path(tmp_path, "a/b") == tmp_path / ".locks" / "a" / "b.lock"
    assert cs.try_lock_slide(tmp_path, "a/b") is None  # another open file: refused, even in this process
    other = cs.try_lock_slide(tmp_path, "a/c")
    assert other is not None
    first.release()
    assert not first.held
    again = cs.try_lock_slide(tmp_path, "a/b")
    assert again is not None
    again.release()
    other.release()
    first.release()  # twice is harmless


_HOLD = """
import sys, time
from pathlib import Path
from wsi_grunet.cohort_state import try_lock_slide
lock = try_lock_slide(Path(sys.argv[1]), "s")
print("held" if lock else "refused", flush=True)
time.sleep(600)
"""


def test_lock_of_a_killed_holder_is_free(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert cs.try_lock_slide(tmp_path, "s") is None
        assert f"{holder.pid} " in cs.lock_path(tmp_path, "s").read_text()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = cs.try_lock_slide(tmp_path, "s")
    assert lock is not None
    lock.release()


def test_stale_folders_removed_only_under_the_lock(tmp_path):
    final = tmp_path / "grp" / "slide"
    final.parent.mkdir()
    stale = [
        final.parent / ".slide.partial-999999",
        final.parent / ".slide.partial-12-x",
        final.parent / ".slide.old-4242",
    ]
    own = final.parent / f".slide.partial-{os.getpid()}"
    other_slide = final.parent / ".slide2.partial-999999"
    for path in (*stale, own, other_slide):
        (path / "work").mkdir(parents=True)
        (path / "work" / "f").write_text("x")
    assert cs.stale_folders(final, own_pid=os.getpid()) == sorted(stale)
    lock = cs.try_lock_slide(tmp_path, "grp/slide")
    assert lock is not None
    assert cs.remove_stale_folders(final, lock) == sorted(stale)
    assert not any(p.exists() for p in stale)
    assert own.exists() and other_slide.exists()
    lock.release()
    with pytest.raises(RuntimeError, match="lock"):
        cs.remove_stale_folders(final, lock)


def test_stale_folder_names_with_glob_characters(tmp_path):
    final = tmp_path / "a[1]"
    (tmp_path / ".a[1].partial-77").mkdir()
    (tmp_path / ".a1.partial-77").mkdir()
    assert cs.stale_folders(final) == [tmp_path / ".a[1].partial-77"]


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_ledger_merges_reruns(tmp_path):
    cs.update_ledger(
        tmp_path,
        [
            cs.ledger_row("/s/a.svs", "a", "ok", nuclei=10, tiles=2, seconds=1.5, weights_sha256="w", fingerprint="fa"),
            cs.ledger_row("/s/b.svs", "b", "failed", error="bad\nslide"),
        ],
    )
    rows = _read(tmp_path / "cohort.csv")
    assert [r["name"] for r in rows] == ["a", "b"]
    assert list(rows[0]) == list(cs.LEDGER_FIELDS)
    assert rows[0]["nuclei"] == "10" and rows[0]["fingerprint"] == "fa" and rows[1]["error"] == "bad slide"
    first_finished = rows[0]["finished_at"]
    # rerun touching only b; a is kept. Then a skipped (same fingerprint) keeps a's ok row, busy never replaces.
    cs.update_ledger(
        tmp_path,
        [cs.ledger_row("/s/b.svs", "b", "ok", nuclei=3, fingerprint="fb"), cs.ledger_row("/s/c.svs", "c", "busy")],
    )
    cs.update_ledger(
        tmp_path,
        [
            cs.ledger_row("/s/a.svs", "a", "skipped", nuclei=10, fingerprint="fa", finished_at="2099-01-01T00:00:00Z"),
            cs.ledger_row("/s/b.svs", "b", "busy"),
        ],
    )
    rows = {r["name"]: r for r in _read(tmp_path / "cohort.csv")}
    assert set(rows) == {"a", "b", "c"}
    assert rows["a"]["status"] == "ok" and rows["a"]["finished_at"] == first_finished
    assert rows["b"]["status"] == "ok" and rows["b"]["nuclei"] == "3"
    assert rows["c"]["status"] == "busy"
    # a changed fingerprint: the skipped row (of another result) replaces the old one
    cs.update_ledger(tmp_path, [cs.ledger_row("/s/a.svs", "a", "skipped", fingerprint="fa2")])
    assert {r["name"]: r for r in _read(tmp_path / "cohort.csv")}["a"]["fingerprint"] == "fa2"
    assert not list(tmp_path.glob(".cohort.csv.*.tmp"))
    with pytest.raises(ValueError, match="status"):
        cs.ledger_row("x", "x", "done")


def _write_rows(out: str, first: int, count: int) -> None:
    for k in range(first, first + count):
        cs.update_ledger(Path(out), [cs.ledger_row(f"/s/{k}.svs", f"s{k:03d}", "ok", nuclei=k)])


def test_concurrent_ledger_writers_keep_every_row(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_rows, args=(str(tmp_path), 40 * i, 40)) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    rows = _read(tmp_path / "cohort.csv")
    assert sorted(int(r["nuclei"]) for r in rows) == list(range(120))
