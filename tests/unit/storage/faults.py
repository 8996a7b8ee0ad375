"""Real storage faults for tests: a read-only bind mount and a small tmpfs (a disk that fills up).

Both need root and mount(2); where they are missing the test is skipped with that reason. Root
ignores permission bits, so chmod cannot make a folder read-only for these tests; a read-only
mount gives the real EROFS every process sees.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def _mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot simulate the fault: mount {' '.join(args)} failed ({done.stderr.strip()[:200]})")


@contextmanager
def read_only(path: Path) -> Iterator[Path]:
    """`path` (a folder) read-only for every process until the block ends."""
    if os.geteuid() != 0:
        pytest.skip("cannot simulate a read-only folder: needs root to bind-mount (permission bits do not bind root)")
    _mount("--bind", str(path), str(path))
    try:
        _mount("-o", "remount,ro,bind", str(path))
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


@contextmanager
def small_disk(path: Path, size_kb: int) -> Iterator[Path]:
    """A tmpfs of `size_kb` mounted on `path` (created if needed) until the block ends."""
    if os.geteuid() != 0:
        pytest.skip("cannot simulate a full disk: needs root to mount a small tmpfs")
    path.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path))
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def fill(folder: Path, leave_bytes: int = 0) -> Path:
    """Fill the file system of `folder` up to `leave_bytes` free with one filler file."""
    st = os.statvfs(folder)
    filler = folder / "filler"
    with open(filler, "wb") as f:
        left = st.f_bavail * st.f_frsize - leave_bytes
        while left > 0:
            left -= f.write(b"\0" * min(left, 1 << 20))
    return filler
