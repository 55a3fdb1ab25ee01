"""The daemon config: lookup order, validation that names the bad key, config init."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from helpers import run_hm

from headmaster import HeadmasterError
from headmaster.config import Config, config_init, load_config, read_config

ROOT = Path(__file__).parent.parent


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_example_documents_every_key_with_its_default():
    example = read_config(ROOT / "config.example.toml")
    assert example.to_dict() == Config().to_dict()
    with open(ROOT / "config.example.toml", "rb") as f:
        data = tomllib.load(f)
    assert data == Config().to_dict()  # nothing missing, nothing extra


def test_lookup_order(tmp_path, monkeypatch):
    ws = tmp_path / "ws"
    monkeypatch.setenv("HEADMASTER_WORKSPACE", str(ws))
    monkeypatch.delenv("HEADMASTER_CONFIG", raising=False)
    assert load_config().daemon.debounce_seconds == 30.0  # nothing found: defaults
    assert load_config().workspace_root == ws.absolute()
    write(ws / "config.toml", "[daemon]\ndebounce_seconds = 5\n")
    assert load_config().daemon.debounce_seconds == 5.0
    env_file = write(tmp_path / "env.toml", "[daemon]\ndebounce_seconds = 6\n")
    monkeypatch.setenv("HEADMASTER_CONFIG", str(env_file))
    assert load_config().daemon.debounce_seconds == 6.0
    explicit = write(tmp_path / "explicit.toml", "[daemon]\ndebounce_seconds = 7\n")
    assert load_config(explicit).daemon.debounce_seconds == 7.0


def test_relative_paths_follow_the_config_file(tmp_path, monkeypatch):
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    cfg = read_config(write(tmp_path / "etc" / "hm.toml", 'workspace = "../data"\n[inbox]\npath = "drop"\n'))
    assert cfg.workspace_root == (tmp_path / "etc" / ".." / "data").absolute()
    assert cfg.inbox_dir == cfg.workspace_root / "drop"
    assert cfg.socket_path == cfg.workspace_root / ".hmd.sock"
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    assert cfg.socket_path == tmp_path / "headmaster" / "hmd.sock"


@pytest.mark.parametrize("text, key", [
    ("[daemon]\ndebounce = 3\n", "daemon.debounce"),
    ("colour = 1\n", "colour"),
    ("[daemon]\nsettle_seconds = \"fast\"\n", "daemon.settle_seconds"),
    ("[daemon]\nlog_retention = 1.5\n", "daemon.log_retention"),
    ("[learning]\nfrom_corrections = 1\n", "learning.from_corrections"),
    ("workspace = 3\n", "workspace"),
    ("daemon = 3\n", "daemon"),
    ("[daemon]\nmax_delay_seconds = 0\n", "daemon.max_delay_seconds"),
    ("[daemon]\nlog_level = \"LOUD\"\n", "daemon.log_level"),
    ("[embedding]\nmax_pixels = 1000\n", "embedding.max_pixels"),
    ("[embedding]\nmax_pixels = \"lots\"\n", "embedding.max_pixels"),
])
def test_bad_key_or_type_names_the_key(tmp_path, text, key):
    with pytest.raises(HeadmasterError) as e:
        read_config(write(tmp_path / "c.toml", text))
    assert f"'{key}'" in str(e.value)


def test_library_tables(tmp_path):
    cfg = read_config(write(tmp_path / "c.toml", '[[library]]\npath = "~/Pictures"\n'
                                                 '[[library]]\npath = "/srv/photos"\nheads = ["nsfw", "clothing"]\n'
                                                 'txt = true\nxmp = false\nrecursive = false\n'))
    first, second = cfg.library
    assert first.root == Path("~/Pictures").expanduser() and first.heads is None and first.xmp and not first.txt \
        and first.recursive
    assert (second.heads, second.xmp, second.txt, second.recursive) == (["nsfw", "clothing"], False, True, False)
    assert cfg.to_dict()["library"][0] == {"path": "~/Pictures", "heads": "all", "xmp": True, "txt": False,
                                           "recursive": True}
    assert Config().library == [] and "library" not in Config().to_dict()
    inside = read_config(write(tmp_path / "w.toml", 'workspace = "/srv/photos/headmaster"\n'
                                                    '[[library]]\npath = "/srv/photos"\n'))
    assert inside.library[0].root == Path("/srv/photos")  # a workspace inside a library is fine: it is left out


@pytest.mark.parametrize("text, key", [
    ('[[library]]\nheads = "all"\n', "library[0].path"),
    ('[[library]]\npath = "photos"\n', "library[0].path"),
    ('[[library]]\npath = "/p"\n[[library]]\npath = "/p/sub"\n', "library[1].path"),
    ('[[library]]\npath = "/p"\nheads = "some"\n', "library[0].heads"),
    ('[[library]]\npath = "/p"\nheads = []\n', "library[0].heads"),
    ('[[library]]\npath = "/p"\nxmp = "yes"\n', "library[0].xmp"),
    ('[[library]]\npath = "/p"\nxmp = false\n', "library[0].xmp"),
    ('[[library]]\npath = "/p"\ntags = 1\n', "library[0].tags"),
    ('library = 3\n', "library"),
    ('workspace = "/srv/hm"\n[[library]]\npath = "/srv/hm/photos"\n', "library[0].path"),
    ('workspace = "/srv/hm"\n[[library]]\npath = "/srv/hm"\n', "library[0].path"),
])
def test_bad_library_names_the_key(tmp_path, text, key):
    with pytest.raises(HeadmasterError) as e:
        read_config(write(tmp_path / "c.toml", text))
    assert f"'{key}'" in str(e.value)


def test_invalid_toml_and_missing_file(tmp_path):
    with pytest.raises(HeadmasterError, match="not valid TOML"):
        read_config(write(tmp_path / "c.toml", "[daemon\n"))
    with pytest.raises(HeadmasterError, match="not found"):
        load_config(tmp_path / "nope.toml")


def test_config_init_writes_defaults_and_never_overwrites(tmp_path):
    path = config_init(tmp_path / "c.toml", tmp_path / "ws")
    cfg = read_config(path)
    assert cfg.workspace_root == (tmp_path / "ws").absolute()
    assert cfg.daemon == Config().daemon and cfg.inbox == Config().inbox
    before = path.read_bytes()
    with pytest.raises(HeadmasterError, match="already exists"):
        config_init(path)
    assert path.read_bytes() == before


def test_hm_config_init_cli(workspace):
    r = run_hm(["config", "init"], workspace)
    assert r.returncode == 0, r.stderr
    assert (workspace / "config.toml").is_file()
    assert read_config(workspace / "config.toml").workspace_root == workspace.absolute()
    r = run_hm(["config", "init"], workspace)
    assert r.returncode == 1 and r.stderr.startswith("Error: ") and "already exists" in r.stderr


def test_hmctl_config_init(tmp_path):
    target = tmp_path / "etc" / "hm.toml"
    r = subprocess.run([sys.executable, "-m", "headmaster.ctl", "config", "init", "--path", str(target)],
                       capture_output=True, text=True, env={**os.environ, "HEADMASTER_WORKSPACE": str(tmp_path / "ws")})
    assert r.returncode == 0 and r.stdout.strip() == f"Wrote {target}"
    assert read_config(target).workspace_root == (tmp_path / "ws").absolute()
    r = subprocess.run([sys.executable, "-m", "headmaster.ctl", "config", "init", "--path", str(target)],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "already exists" in r.stderr
