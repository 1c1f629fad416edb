"""What a cohort run knows about the slides in its output folder, so reruns and concurrent runs are safe.

- **Fingerprint** of a slide's result: SHA-256 over the weights' hash, the settings that change what
  is written, and the slide file's resolved path, size and modification time. It is stored in
  ``report.json``; a finished slide is skipped only when its report has status ``ok`` and the same
  fingerprint, so a changed setting, new weights or a replaced slide file redo the slide.
- **Slide lock**: an exclusive, non-blocking ``fcntl.flock`` on ``<out>/.locks/<name>.lock``, held
  from the check "is it finished?" until the slide's folder is in place. The kernel drops it when the
  holder dies (``kill -9``, node reboot), so a lock is never left stuck. A slide locked by another
  live run is reported ``busy`` and left to that run.
  Caveat: ``flock`` on NFS is only as good as the NFS client (Linux >= 2.6.12 maps it onto POSIX
  byte-range locks served by the NFS lock manager; NFSv3 without ``lockd``, or mounts with ``nolock``,
  give every host its own local lock, so two hosts could process the same slide at once). Use a
  file system with working locks (NFSv4, Lustre with ``flock`` mount option, GPFS, BeeGFS) for
  concurrent runs from several hosts.
- **Stale temporary folders** (``.<leaf>.partial-<pid>`` and ``.<leaf>.old-<pid>`` beside a slide's
  folder) belong to a writer that is gone once the slide's lock is free; the run that takes the lock
  removes them.
- **Ledger** ``<out>/cohort.csv``: one row per slide, merged on rerun (rows of slides this run did
  not touch stay), written atomically (temporary file + ``os.replace``) under a lock on the csv so
  two runs finishing slides at the same time both keep their rows.
"""

from __future__ import annotations

import csv
import dataclasses
import fcntl
import hashlib
import io
import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .config import RunConfig

LOCK_DIR = ".locks"
LEDGER = "cohort.csv"
LEDGER_FIELDS = (
    "slide",
    "name",
    "status",
    "nuclei",
    "tiles",
    "seconds",
    "weights_sha256",
    "fingerprint",
    "error",
    "finished_at",
)
STATUSES = ("ok", "skipped", "failed", "busy")
# model.device, batch_size, threads, channels_last, backend, cluster.*, slurm.* and output.overwrite only
# change where and how fast the work runs. model.amp is kept: bf16 and fp32 give (slightly) different
# probabilities. output.formats decides which files exist, chunk/pyramid_levels/slide_rgb/preview_max_px
# what they hold, so they are kept too.
RESULT_MODEL_KEYS = ("weights", "tta", "amp")
RESULT_OUTPUT_KEYS = ("formats", "chunk", "pyramid_levels", "slide_rgb", "preview_max_px")


def result_settings(cfg: RunConfig) -> dict[str, Any]:
    """The part of the run config that changes a slide's results."""
    model = dataclasses.asdict(cfg.model)
    output = dataclasses.asdict(cfg.output)
    return {
        "model": {key: model[key] for key in RESULT_MODEL_KEYS},
        "slide": dataclasses.asdict(cfg.slide),
        "tiling": dataclasses.asdict(cfg.tiling),
        "tissue": dataclasses.asdict(cfg.tissue),
        "postprocess": dataclasses.asdict(cfg.postprocess),
        "output": {
            **{key: sorted(output[key]) if key == "formats" else output[key] for key in RESULT_OUTPUT_KEYS},
            "chunk": cfg.zarr_chunk,  # resolved: auto and the edge it stands for write the same store
        },
    }


def slide_identity(slide: Path) -> dict[str, Any]:
    """Resolved path, size and mtime of the slide file; for a folder (a DICOM series, an MRXS
    companion folder) the same for each file inside, so a replaced file changes the identity."""
    path = slide.resolve()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return {
            "path": str(path),
            "files": [[str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns] for p in files],
        }
    stat = path.stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def fingerprint(weights_sha256: str | None, settings: Mapping[str, Any], identity: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of weights hash, result settings and slide identity."""
    text = json.dumps(
        {"weights_sha256": weights_sha256, "settings": settings, "slide": identity},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(text.encode()).hexdigest()


def slide_fingerprint(
    slide: Path, cfg: RunConfig, weights_sha256: str | None, weights_postprocess: Mapping[str, Any] | None = None
) -> str:
    """Fingerprint of one slide's results. ``weights_postprocess`` are the post-processing values
    stored beside the weights: tuned again, they change the nuclei while the tensors stay the same."""
    settings = {**result_settings(cfg), "weights_postprocess": dict(weights_postprocess or {})}
    return fingerprint(weights_sha256, settings, slide_identity(slide))


def finished_report(final_dir: Path, expected: str) -> dict[str, Any] | None:
    """The slide's report when it is finished with the same fingerprint, else None."""
    try:
        report = json.loads((final_dir / "report.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or report.get("status") != "ok" or report.get("fingerprint") != expected:
        return None
    return report


# --- locks --------------------------------------------------------------------------------------------


def lock_path(out_root: Path, name: str) -> Path:
    return out_root / LOCK_DIR / f"{name}.lock"


class SlideLock:
    """An exclusive ``flock`` held on an open file; ``release()`` (or the holder's death) frees it.

    The lock file itself is never deleted: deleting it while another process has it open would let a
    third process lock a new file of the same name while the second still holds the old one.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self._fd = path, fd

    @property
    def held(self) -> bool:
        return self._fd >= 0

    def release(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    def __enter__(self) -> SlideLock:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def try_lock(path: Path) -> SlideLock | None:
    """Take the lock at ``path`` without waiting; None when another open file holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {os.uname().nodename}\n".encode())  # who holds it, for people looking
    return SlideLock(path, fd)


def try_lock_slide(out_root: Path, name: str) -> SlideLock | None:
    return try_lock(lock_path(out_root, name))


@contextmanager
def held_lock(path: Path) -> Iterator[None]:
    """A blocking exclusive lock for a short critical section (the ledger update)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock


def stale_folders(final_dir: Path, own_pid: int | None = None) -> list[Path]:
    """Temporary folders of earlier writers beside ``final_dir`` (not this process's own)."""
    parent, leaf = final_dir.parent, final_dir.name
    if not parent.is_dir():
        return []
    out = []
    for prefix in (f".{leaf}.partial-", f".{leaf}.old-"):
        for path in parent.glob(f"{glob_escape(prefix)}*"):
            rest = path.name[len(prefix) :]
            pid = rest.split("-", 1)[0]
            if own_pid is not None and pid == str(own_pid):
                continue
            out.append(path)
    return sorted(out)


def glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def remove_stale_folders(final_dir: Path, lock: SlideLock) -> list[Path]:
    """With the slide's lock held (so no live writer owns them), remove earlier writers' temporary folders."""
    if not lock.held:
        raise RuntimeError(f"{lock.path}: stale folders are removed only while the slide's lock is held")
    removed = stale_folders(final_dir, own_pid=os.getpid())
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed


# --- ledger -------------------------------------------------------------------------------------------


def ledger_row(
    slide: str,
    name: str | None,
    status: str,
    *,
    nuclei: int = 0,
    tiles: int = 0,
    seconds: float = 0.0,
    weights_sha256: str | None = None,
    fingerprint: str | None = None,
    error: str | None = None,
    finished_at: str | None = None,
) -> dict[str, str]:
    if status not in STATUSES:
        raise ValueError(f"ledger status {status!r} is not one of {', '.join(STATUSES)}")
    return {
        "slide": slide,
        "name": name or "",
        "status": status,
        "nuclei": str(int(nuclei)),
        "tiles": str(int(tiles)),
        "seconds": f"{seconds:.3f}",
        "weights_sha256": weights_sha256 or "",
        "fingerprint": fingerprint or "",
        "error": (error or "").replace("\n", " "),
        "finished_at": finished_at or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def merge_rows(existing: Mapping[str, dict[str, str]], new: Iterable[dict[str, str]]) -> dict[str, dict[str, str]]:
    """Rows by output name (the slide's identity within one output folder).

    A ``busy`` row never replaces a row (the run that holds the slide writes its own); a ``skipped``
    row keeps an existing ``ok`` row of the same fingerprint (it says more: when and how long).
    """
    merged = dict(existing)
    for row in new:
        key = row["name"] or row["slide"]
        old = merged.get(key)
        if old is not None and row["status"] == "busy":
            continue
        if (
            old is not None
            and row["status"] == "skipped"
            and old.get("status") == "ok"
            and old.get("fingerprint") == row["fingerprint"]
        ):
            continue
        merged[key] = row
    return merged


def read_ledger(path: Path) -> dict[str, dict[str, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    rows = {}
    for row in csv.DictReader(io.StringIO(text)):
        full = {field: row.get(field) or "" for field in LEDGER_FIELDS}
        rows[full["name"] or full["slide"]] = full
    return rows


def update_ledger(out_root: Path, rows: Iterable[dict[str, str]]) -> Path:
    """Merge ``rows`` into ``<out>/cohort.csv`` (sorted by name), atomically, under the ledger's lock."""
    path = out_root / LEDGER
    with held_lock(out_root / LOCK_DIR / f"{LEDGER}.lock"):
        merged = merge_rows(read_ledger(path), rows)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=LEDGER_FIELDS, lineterminator="\n")
        writer.writeheader()
        for key in sorted(merged):
            writer.writerow(merged[key])
        tmp = out_root / f".{LEDGER}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8", newline="") as handle:
                handle.write(buffer.getvalue())
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:  # the ledger keeps its last complete version and no half-written copy stays
            tmp.unlink(missing_ok=True)
            raise
    return path


def row_from_report(out_root: Path, name: str) -> dict[str, str]:
    """A ledger row rebuilt from a slide's ``report.json`` (failed when it is missing or not ok)."""
    folder = out_root / name
    try:
        report = json.loads((folder / "report.json").read_text())
    except (OSError, ValueError) as exc:
        return ledger_row("", name, "failed", error=f"{folder / 'report.json'}: no finished report ({exc})")
    counts, timings = report.get("counts") or {}, report.get("timings") or {}
    finished = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime((folder / "report.json").stat().st_mtime))
    return ledger_row(
        (report.get("slide") or {}).get("path", ""),
        name,
        "ok" if report.get("status") == "ok" else "failed",
        nuclei=int(counts.get("nuclei", 0)),
        tiles=int(counts.get("tiles_with_tissue", 0)),
        seconds=float(timings.get("total_s", 0.0)),
        weights_sha256=(report.get("model") or {}).get("sha256"),
        fingerprint=report.get("fingerprint"),
        finished_at=finished,
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m wsi_grunet.cohort_state OUT NAME...``: merge rows rebuilt from the slides' reports
    into ``OUT/cohort.csv`` (for workflows that run each slide separately)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m wsi_grunet.cohort_state OUT_DIR [NAME ...]", file=sys.stderr)
        return 2
    out_root = Path(args[0])
    rows = [row_from_report(out_root, name) for name in args[1:]]
    print(update_ledger(out_root, rows))
    return 1 if any(row["status"] != "ok" for row in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
