"""Ray for the tests: the skip mark, the ``ray`` command, and the
processes that run a tensor-parallel rank (the ``ray_env`` fixture is in
conftest.py)."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="needs Ray (pip install 'pllm[ray]')")


def ray_cli() -> str:
    return shutil.which("ray") or str(Path(sys.executable).parent / "ray")


def rank_processes() -> list:
    """Ray worker processes running a rank (their title names the actor)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any("RankActor" in part for part in proc.info["cmdline"] or ()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


