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
