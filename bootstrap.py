#!/usr/bin/env python3
"""Set up headmaster on a machine that has Python 3.11+ and nothing else.

    python3 bootstrap.py        # uv if it is missing, then the project's environment (uv sync)

1. Finds uv on PATH or in ~/.local/bin. If there is none, it fetches the uv wheel for this machine
   from PyPI (a pinned version, its SHA-256 checked against PyPI's), and puts the `uv` and `uvx`
   programs from it into ~/.local/bin. No pip, no venv module, no curl, no root needed: Debian's
   python3 (which refuses `pip install --user`) is enough.
2. Runs `uv sync --locked --compile-bytecode`: Python packages as uv.lock pins them, into .venv/.
   The largest are PyTorch and, on Linux, the NVIDIA libraries it depends on (about 3 GB to
   download; see the README for how long it took).

Then `uv run hm demo` runs the demo offline (add ~/.local/bin to PATH first if it is not there).
Standard library only, on purpose: it runs before anything is installed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

UV_VERSION = "0.13.9"  # the uv this project is tested with
PYPI_JSON = "https://pypi.org/pypi/uv/json"  # every release's files, with their SHA-256
BIN = Path.home() / ".local" / "bin"
ROOT = Path(__file__).resolve().parent


class BootstrapError(Exception):
    """One line for the user; bootstrap exits 1."""


def wheel_tags(system: str, machine: str, libc: str) -> tuple[str, str] | None:
    """(platform prefix, architecture) a uv wheel's filename must carry here, or None where uv ships none."""
    arch = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}.get(machine.lower())
    if arch is None:
        return None
    if system == "Linux":
        return ("manylinux" if libc == "glibc" else "musllinux"), arch
    if system == "Darwin":
        return "macosx", "arm64" if arch == "aarch64" else "x86_64"
    return None


def choose_wheel(files: list[dict], system: str, machine: str, libc: str) -> dict:
    """The wheel of PyPI's release `files` (its JSON 'urls') that runs on this machine."""
    tags = wheel_tags(system, machine, libc)
    if tags is None:
        raise BootstrapError(f"no uv build for {system} {machine}: install uv yourself "
                             "(https://docs.astral.sh/uv/getting-started/installation/), then run this again")
    prefix, arch = tags
    for f in files:
        name = f["filename"]
        if name.endswith(".whl") and "-py3-none-" in name and any(
                tag.startswith(prefix) and tag.endswith(arch) for tag in name[:-4].split("-")[-1].split(".")):
            return f
    raise BootstrapError(f"uv {UV_VERSION} on PyPI has no wheel for {system} {machine} ({libc or 'no libc'})")


def install_from_wheel(data: bytes, bin_dir: Path) -> Path:
    """Put the `uv` and `uvx` programs of a uv wheel into `bin_dir` (each written whole, then renamed)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    installed = None
    with zipfile.ZipFile(io.BytesIO(data)) as wheel:
        for info in wheel.infolist():
            parts = info.filename.split("/")
            if len(parts) == 3 and parts[0].endswith(".data") and parts[1] == "scripts" and parts[2] in ("uv", "uvx"):
                target = bin_dir / parts[2]
                tmp = target.with_name(f".{parts[2]}.part")
                tmp.write_bytes(wheel.read(info))
                tmp.chmod(0o755)
                os.replace(tmp, target)
                if parts[2] == "uv":
                    installed = target
    if installed is None:
        raise BootstrapError("the uv wheel holds no uv program")
    return installed


def fetch_uv(bin_dir: Path = BIN) -> Path:
    """Download uv's wheel for this machine from PyPI, check its SHA-256, and install its programs."""
    libc = platform.libc_ver()[0] if platform.system() == "Linux" else ""
    try:
        with urllib.request.urlopen(PYPI_JSON, timeout=60) as r:
            project = json.load(r)
        files = project.get("releases", {}).get(UV_VERSION)
        if not files:
            print(f"uv: {UV_VERSION} is not on this index; taking its newest, {project['info']['version']}")
            files = project["urls"]
        wheel = choose_wheel(files, platform.system(), platform.machine(), libc)
        print(f"uv: downloading {wheel['filename']} ({wheel['size'] / 2**20:.0f} MB) from PyPI", flush=True)
        with urllib.request.urlopen(urllib.parse.urljoin(PYPI_JSON, wheel["url"]), timeout=300) as r:
            data = r.read()
    except (OSError, ValueError, KeyError) as e:  # urllib's URLError is an OSError; an odd answer: the others
        raise BootstrapError(f"cannot reach PyPI to fetch uv ({getattr(e, 'reason', e)}): install uv yourself "
                             "(https://docs.astral.sh/uv/getting-started/installation/), then run this again") from None
    if hashlib.sha256(data).hexdigest() != wheel["digests"]["sha256"]:
        raise BootstrapError(f"{wheel['filename']}: its SHA-256 does not match PyPI's; not installed")
    return install_from_wheel(data, bin_dir)


def find_uv(bin_dir: Path = BIN) -> Path | None:
    found = shutil.which("uv")
    if found:
        return Path(found)
    local = bin_dir / "uv"
    return local if local.is_file() and os.access(local, os.X_OK) else None


def main() -> int:
    if sys.version_info < (3, 11):
        print(f"headmaster needs Python 3.11 or newer; this is {platform.python_version()}", file=sys.stderr)
        return 1
    try:
        uv = find_uv()
        if uv is None:
            uv = fetch_uv()
            print(f"uv: installed {uv}", flush=True)
        else:
            print(f"uv: using {uv}", flush=True)
    except BootstrapError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    started = time.monotonic()
    print("Installing headmaster's packages into .venv (uv sync; the first time downloads PyTorch)", flush=True)
    code = subprocess.call([str(uv), "sync", "--locked", "--compile-bytecode"], cwd=ROOT)
    if code != 0:
        print(f"Error: uv sync failed (exit {code}); its message is above", file=sys.stderr)
        return code
    print(f"Ready in {time.monotonic() - started:.0f} s: `uv run hm demo` runs the demo, `uv run pytest` the tests"
          + ("" if str(uv.parent) in os.environ.get("PATH", "").split(os.pathsep)
             else f" (put {uv.parent} on your PATH first: export PATH=\"{uv.parent}:$PATH\")"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
