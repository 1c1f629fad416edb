"""Shared fixtures. Data from ../shared is optional: tests that need it skip with a reason."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DIR = REPO_ROOT.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (SHARED_DIR / "README.md").exists():
        pytest.skip(f"{SHARED_DIR} is absent: this test needs the shared slides and datasets")
    return SHARED_DIR


@pytest.fixture(scope="module")
def one_torch_thread():
    """Narrow models gain nothing from intra-op threads, and spinning OpenMP workers slow down badly
    when another process shares the cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A narrow, untrained GRU-Net checkpoint at 0.5 um/px: fast on CPU, for plumbing tests."""
    import torch

    from wsi_grunet.model.checkpoint import save_checkpoint
    from wsi_grunet.model.grunet import GRUNet, GRUNetConfig

    torch.manual_seed(0)
    model = GRUNet(GRUNetConfig(base_filters=4, attention_width=8)).eval()
    out = tmp_path_factory.mktemp("tiny") / "tiny"
    save_checkpoint(out, model, {"mpp": 0.5, "patch_size": 256, "threshold": 0.5, "trained": False})
    return out


@pytest.fixture(scope="session")
def slurm_cohort(tmp_path_factory, tiny_checkpoint):
    """Two small slides and a bad one, with a local reference run of them (exit 1: the bad slide), for
    the SLURM, workflow and resume tests. Returns (root, good slide names, run arguments); the slides
    are in ``root/slides``, the reference results in ``root/local``."""
    from slurm_support import RUN_SETTINGS, make_cohort, run_cli

    root = tmp_path_factory.mktemp("slurm-cohort")
    names = make_cohort(root / "slides", count=2, bad=True)
    args = ["--weights", str(tiny_checkpoint), *RUN_SETTINGS]
    local = run_cli(root / "slides", "--out", root / "local", "--workers", "1", *args)
    assert local.returncode == 1, local.stdout + local.stderr
    return root, names, args
