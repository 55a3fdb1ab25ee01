"""bootstrap.py, the set-up on a machine with Python only: which uv wheel fits, and installing its programs.

The download itself needs PyPI (no network in the tests); `.ci/run` runs the whole script the README's way.
"""

from __future__ import annotations

import io
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import bootstrap  # noqa: E402

FILES = [{"filename": f"uv-0.13.9-py3-none-{tag}.whl"} for tag in (
    "linux_armv6l", "macosx_10_12_x86_64", "macosx_11_0_arm64",
    "manylinux_2_17_aarch64.manylinux2014_aarch64.musllinux_1_1_aarch64",
    "manylinux_2_17_x86_64.manylinux2014_x86_64", "musllinux_1_1_x86_64", "win_amd64")] + [
    {"filename": "uv-0.13.9.tar.gz"}]


@pytest.mark.parametrize("system, machine, libc, tag", [
    ("Linux", "x86_64", "glibc", "manylinux_2_17_x86_64.manylinux2014_x86_64"),
    ("Linux", "x86_64", "", "musllinux_1_1_x86_64"),
    ("Linux", "aarch64", "glibc", "manylinux_2_17_aarch64.manylinux2014_aarch64.musllinux_1_1_aarch64"),
    ("Linux", "aarch64", "", "manylinux_2_17_aarch64.manylinux2014_aarch64.musllinux_1_1_aarch64"),
    ("Darwin", "arm64", "", "macosx_11_0_arm64"),
    ("Darwin", "x86_64", "", "macosx_10_12_x86_64"),
])
def test_the_wheel_for_this_machine(system, machine, libc, tag):
    assert bootstrap.choose_wheel(FILES, system, machine, libc)["filename"] == f"uv-0.13.9-py3-none-{tag}.whl"


@pytest.mark.parametrize("system, machine", [("Linux", "riscv64"), ("Windows", "AMD64"), ("FreeBSD", "amd64")])
def test_no_wheel_is_one_clear_error(system, machine):
    with pytest.raises(bootstrap.BootstrapError, match="install uv yourself|has no wheel"):
        bootstrap.choose_wheel(FILES, system, machine, "")


def wheel(*members: tuple[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members:
            z.writestr(name, data)
    return buf.getvalue()


def test_installs_uv_and_uvx_from_the_wheel(tmp_path, monkeypatch):
    script = b"#!/bin/sh\necho uv 9.9.9\n"
    data = wheel(("uv-9.9.9.data/scripts/uv", script), ("uv-9.9.9.data/scripts/uvx", b"#!/bin/sh\n"),
                 ("uv/__init__.py", b""), ("uv-9.9.9.dist-info/METADATA", b"Name: uv\n"))
    installed = bootstrap.install_from_wheel(data, tmp_path / "bin")
    assert installed == tmp_path / "bin" / "uv" and installed.read_bytes() == script
    assert subprocess.run([installed], capture_output=True, text=True).stdout == "uv 9.9.9\n"  # executable
    assert sorted(p.name for p in (tmp_path / "bin").iterdir()) == ["uv", "uvx"]  # no temp file left
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no uv on PATH: the one in the bin folder is found
    assert bootstrap.find_uv(tmp_path / "bin") == installed and bootstrap.find_uv(tmp_path / "none") is None
    with pytest.raises(bootstrap.BootstrapError, match="no uv program"):
        bootstrap.install_from_wheel(wheel(("uv/__init__.py", b"")), tmp_path / "other")


def test_old_python_is_refused_in_one_line(tmp_path):
    """The version check runs before anything else; here with this Python faked as 3.10 by the script itself."""
    code = ("import sys; sys.version_info = (3, 10, 0); sys.argv = ['bootstrap.py']; "
            f"sys.path.insert(0, {str(ROOT)!r}); import bootstrap; sys.exit(bootstrap.main())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.startswith("headmaster needs Python 3.11 or newer") and "Traceback" not in r.stderr
