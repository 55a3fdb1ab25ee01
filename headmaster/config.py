"""The daemon's configuration: a TOML file read with tomllib, validated up front.

Lookup order: an explicit path (`--config`), then $HEADMASTER_CONFIG, then
`<workspace>/config.toml`, else the defaults below. Every key is optional; an
unknown key or a value of the wrong type is a HeadmasterError that names the key.
`config.example.toml` at the repository root documents every key.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import tomli_w

from headmaster import HeadmasterError
from headmaster.workspace import Workspace

CONFIG_ENV = "HEADMASTER_CONFIG"
CONFIG_NAME = "config.toml"
MIN_MAX_PIXELS = 1_000_000  # [embedding] max_pixels below one megapixel would refuse ordinary photos
BACKENDS = ("auto", "torch", "onnxruntime")  # [embedding] backend, hm --backend: headmaster.embedding.backends
LOOPBACK_NAMES = ("localhost",)
WILDCARDS = ("0.0.0.0", "::", "")  # listening on every address
LOG_LEVELS = ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL")


@dataclass
class DaemonConfig:
    socket: str = ""  # "": $XDG_RUNTIME_DIR/headmaster/hmd.sock, else <workspace>/.hmd.sock
    debounce_seconds: float = 30.0  # quiet time after the last change before a head retrains
    max_delay_seconds: float = 300.0  # retrain at the latest this long after the first change
    settle_seconds: float = 2.0  # a file is complete once size and mtime are unchanged this long
    device: str = ""  # "": cuda, then mps, then cpu
    log_level: str = "INFO"
    log_file: str = ""  # "": stderr only; relative paths are inside the workspace
    log_rotation: str = "10 MB"  # loguru rotation for log_file
    log_retention: int = 5  # rotated log files kept
    model_idle_seconds: float = 300.0  # the worker (and its model) exits after this long without work; 0: stays
    max_batch_images: int = 256  # files per worker request: its memory stays within one window in a burst


@dataclass
class InboxConfig:
    path: str = "inbox"  # relative to the workspace; one folder per head inside
    dry_run: bool = False  # log each decision (file, bucket, score) and move nothing


TRAIN_KINDS = ("mlp", "linear", "prototype", "auto")  # [training] kind: headmaster.heads (checkpoint.HEAD_KINDS + auto)


@dataclass
class TrainingConfig:
    epochs: int = 50
    lr: float = 1e-3
    seed: int = 0
    kind: str = "auto"  # the kind every retrain makes; auto: the best out of fold (hm train --kind auto)
    max_error: float = 0.0  # >0: the uncertain cut keeps this share of sorted photos wrong at most (--max-error)


@dataclass
class LearningConfig:
    from_corrections: bool = True  # a file the user moves into classified/<head>/<bucket>/ becomes an example
    confirm_after_days: int = 0  # >0: confident sorts left in place this many days become examples too


@dataclass
class WebConfig:
    enabled: bool = True  # hmd serves the review page
    listen: str = "127.0.0.1:7878"  # HOST:PORT; anything but loopback needs `token`
    token: str = ""  # "": no login (loopback only); else every request must carry it


@dataclass
class EmbeddingConfig:
    backend: str = "auto"  # auto, torch or onnxruntime (headmaster.embedding.backends); --backend overrides it
    max_pixels: int = 89_478_485  # decoded pixels per image before it is refused as a bomb (images.MAX_IMAGE_PIXELS)


LIBRARY_KEYS = ("path", "heads", "xmp", "txt", "recursive")


@dataclass
class LibraryConfig:
    """One [[library]] table: a photo tree hmd keeps tagged where it lives (headmaster/daemon/library.py)."""
    path: str  # absolute, or ~/...
    heads: list[str] | None = None  # None: every trained head ("all")
    xmp: bool = True  # photo.jpg.xmp sidecars
    txt: bool = False  # photo.txt captions
    recursive: bool = True  # folders below `path` too

    @property
    def root(self) -> Path:
        return Path(self.path).expanduser()

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "heads": "all" if self.heads is None else list(self.heads), "xmp": self.xmp,
                "txt": self.txt, "recursive": self.recursive}


@dataclass
class Config:
    workspace: str = ""  # "": $HEADMASTER_WORKSPACE, else ./workspace; relative to the config file's folder
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    inbox: InboxConfig = field(default_factory=InboxConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    learning: LearningConfig = field(default_factory=LearningConfig)
    web: WebConfig = field(default_factory=WebConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    library: list[LibraryConfig] = field(default_factory=list)  # [[library]] tables
    source: Path | None = field(default=None, compare=False)  # the file it came from, if any

    # -- resolved paths -----------------------------------------------------------
    @property
    def workspace_root(self) -> Path:
        if not self.workspace:
            return Workspace.from_env().root
        path = Path(self.workspace).expanduser()
        if not path.is_absolute() and self.source is not None:
            path = self.source.parent / path
        return path.absolute()

    @property
    def inbox_dir(self) -> Path:
        path = Path(self.inbox.path).expanduser()
        return path if path.is_absolute() else self.workspace_root / path

    @property
    def socket_path(self) -> Path:
        if self.daemon.socket:
            path = Path(self.daemon.socket).expanduser()
            return path if path.is_absolute() else self.workspace_root / path
        runtime = os.environ.get("XDG_RUNTIME_DIR")
        if runtime and Path(runtime).is_dir():
            return Path(runtime) / "headmaster" / "hmd.sock"
        return self.workspace_root / ".hmd.sock"

    @property
    def log_path(self) -> Path | None:
        if not self.daemon.log_file:
            return None
        path = Path(self.daemon.log_file).expanduser()
        return path if path.is_absolute() else self.workspace_root / path

    def to_dict(self) -> dict[str, Any]:
        """Every key with its value, as written to TOML."""
        out: dict[str, Any] = {"workspace": self.workspace}
        for section in SECTIONS:
            out[section] = {f.name: getattr(getattr(self, section), f.name) for f in fields(SECTIONS[section])}
        if self.library:  # TOML has no empty array of tables: no libraries, no key
            out["library"] = [lib.to_dict() for lib in self.library]
        return out


SECTIONS: dict[str, type] = {"daemon": DaemonConfig, "inbox": InboxConfig, "training": TrainingConfig,
                             "learning": LearningConfig, "web": WebConfig, "embedding": EmbeddingConfig}
TYPE_NAMES = {str: "a string", float: "a number", int: "an integer", bool: "true or false"}


def _check_type(key: str, value: Any, kind: type, where: str) -> Any:
    """The value converted to `kind`, or a HeadmasterError naming the key."""
    ok = (isinstance(value, bool) if kind is bool else
          isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
          isinstance(value, int) and not isinstance(value, bool) if kind is int else
          isinstance(value, kind))
    if not ok:
        shown = repr(value) if not isinstance(value, dict) else "a table"
        raise HeadmasterError(f"{where}: '{key}' must be {TYPE_NAMES[kind]}, got {shown}")
    return float(value) if kind is float else value


def _field_type(cls: type, name: str) -> type:
    annotation = {f.name: f.type for f in fields(cls)}[name]
    return {"str": str, "float": float, "int": int, "bool": bool}[annotation]


def config_from_dict(data: dict[str, Any], source: Path | None = None) -> Config:
    """Build a Config from parsed TOML; unknown keys and wrong types raise HeadmasterError."""
    where = f"config {source}" if source else "config"
    config = Config(source=source)
    for key, value in data.items():
        if key == "workspace":
            config.workspace = _check_type(key, value, str, where)
        elif key in SECTIONS:
            if not isinstance(value, dict):
                raise HeadmasterError(f"{where}: '{key}' must be a table ([{key}]), got {value!r}")
            cls = SECTIONS[key]
            section = getattr(config, key)
            names = [f.name for f in fields(cls)]
            for sub, subvalue in value.items():
                full = f"{key}.{sub}"
                if sub not in names:
                    raise HeadmasterError(f"{where}: unknown key '{full}' (known in [{key}]: {', '.join(names)})")
                setattr(section, sub, _check_type(full, subvalue, _field_type(cls, sub), where))
        elif key == "library":
            config.library = _libraries(value, where)
        else:
            known = ", ".join(["workspace", *(f"[{s}]" for s in SECTIONS), "[[library]]"])
            raise HeadmasterError(f"{where}: unknown key '{key}' (known: {known})")
    _check_values(config, where)
    _check_libraries(config, where)
    return config


def _libraries(value: Any, where: str) -> list[LibraryConfig]:
    """The [[library]] tables, each checked: an absolute path (or ~), heads a list of names or "all"."""
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise HeadmasterError(f"{where}: 'library' must be tables ([[library]]), got {value!r}")
    out: list[LibraryConfig] = []
    roots: dict[Path, str] = {}
    for i, table in enumerate(value):
        at = f"library[{i}]"
        for sub in table:
            if sub not in LIBRARY_KEYS:
                raise HeadmasterError(f"{where}: unknown key '{at}.{sub}' (known in [[library]]: "
                                      f"{', '.join(LIBRARY_KEYS)})")
        if "path" not in table:
            raise HeadmasterError(f"{where}: '{at}.path' is missing: the folder of photos to keep tagged")
        path = _check_type(f"{at}.path", table["path"], str, where)
        if not path or not Path(path).expanduser().is_absolute():
            raise HeadmasterError(f"{where}: '{at}.path' must be an absolute path (or start with ~), got {path!r}")
        heads = table.get("heads", "all")
        if heads == "all":
            names = None
        elif isinstance(heads, list) and heads and all(isinstance(h, str) and h and "/" not in h for h in heads):
            names = list(dict.fromkeys(heads))
        else:
            raise HeadmasterError(f"{where}: '{at}.heads' must be \"all\" or a list of head names, got {heads!r}")
        lib = LibraryConfig(path, names, *(_check_type(f"{at}.{k}", table.get(k, d), bool, where)
                                           for k, d in (("xmp", True), ("txt", False), ("recursive", True))))
        if not (lib.xmp or lib.txt):
            raise HeadmasterError(f"{where}: '{at}.xmp' and '{at}.txt' are both false: nothing to write")
        root = Path(os.path.normpath(lib.root))
        for other, other_at in roots.items():
            if root == other or other in root.parents or root in other.parents:
                raise HeadmasterError(f"{where}: '{at}.path' overlaps '{other_at}.path' ({root} and {other})")
        roots[root] = at
        out.append(lib)
    return out


def _check_libraries(config: Config, where: str) -> None:
    """A library inside the workspace would tag its examples and sorted copies: refused, naming the key."""
    ws = Path(os.path.normpath(config.workspace_root))
    for i, lib in enumerate(config.library):
        root = Path(os.path.normpath(lib.root))
        if root == ws or ws in root.parents:
            raise HeadmasterError(f"{where}: 'library[{i}].path' ({root}) is inside the workspace ({ws}): a library is "
                                  "a photo folder of your own, outside it (the workspace's heads/ and inbox/ are "
                                  "headmaster's)")


def _check_values(config: Config, where: str) -> None:
    d = config.daemon
    for key in ("debounce_seconds", "settle_seconds"):
        if getattr(d, key) < 0:
            raise HeadmasterError(f"{where}: 'daemon.{key}' must be 0 or more, got {getattr(d, key)}")
    if d.max_delay_seconds <= 0:
        raise HeadmasterError(f"{where}: 'daemon.max_delay_seconds' must be above 0, got {d.max_delay_seconds}")
    if d.log_level.upper() not in LOG_LEVELS:
        raise HeadmasterError(f"{where}: 'daemon.log_level' must be one of {', '.join(LOG_LEVELS)}, "
                              f"got {d.log_level!r}")
    if d.model_idle_seconds < 0:
        raise HeadmasterError(f"{where}: 'daemon.model_idle_seconds' must be 0 (stay loaded) or more, "
                              f"got {d.model_idle_seconds}")
    if d.max_batch_images < 1:
        raise HeadmasterError(f"{where}: 'daemon.max_batch_images' must be at least 1, got {d.max_batch_images}")
    if d.log_retention < 0:
        raise HeadmasterError(f"{where}: 'daemon.log_retention' must be 0 or more, got {d.log_retention}")
    if not config.inbox.path:
        raise HeadmasterError(f"{where}: 'inbox.path' must not be empty")
    t = config.training
    if t.epochs < 1:
        raise HeadmasterError(f"{where}: 'training.epochs' must be at least 1, got {t.epochs}")
    if t.lr <= 0:
        raise HeadmasterError(f"{where}: 'training.lr' must be above 0, got {t.lr}")
    if t.kind not in TRAIN_KINDS:
        raise HeadmasterError(f"{where}: 'training.kind' must be one of {', '.join(TRAIN_KINDS)}, got {t.kind!r}")
    if not 0 <= t.max_error < 1:
        raise HeadmasterError(f"{where}: 'training.max_error' must be 0 (off) or a share below 1, "
                              f"got {t.max_error}")
    if config.embedding.backend not in BACKENDS:
        raise HeadmasterError(f"{where}: 'embedding.backend' must be one of {', '.join(BACKENDS)}, "
                              f"got {config.embedding.backend!r}")
    if config.embedding.max_pixels < MIN_MAX_PIXELS:
        raise HeadmasterError(f"{where}: 'embedding.max_pixels' must be at least {MIN_MAX_PIXELS} (one megapixel), "
                              f"got {config.embedding.max_pixels}")
    _check_web(config.web, where)
    if config.learning.confirm_after_days < 0:
        raise HeadmasterError(f"{where}: 'learning.confirm_after_days' must be 0 or more, "
                              f"got {config.learning.confirm_after_days}")


# -- [web] listen: plain rules, shared with `hm serve --listen` and the page's guard (web/security.py) --

def parse_listen(listen: str) -> tuple[str, int]:
    """'HOST:PORT' (IPv6 as '[::1]:PORT') -> (host, port); ValueError with the reason."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"must be HOST:PORT (like 127.0.0.1:7878), got {listen!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"write an IPv6 address in brackets, like [::1]:7878, got {listen!r}")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_listen(listen: str, token: str) -> tuple[str, int]:
    """The (host, port) to bind; ValueError unless it is loopback or a token is set."""
    host, port = parse_listen(listen)
    if not is_loopback(host) and not token:
        raise ValueError(f"{listen} is reachable from other machines; set a token ([web] token, or "
                         f"hm serve --token) to serve the page there, or listen on 127.0.0.1")
    return host, port


def _check_web(web: WebConfig, where: str) -> None:
    try:
        check_listen(web.listen, web.token)
    except ValueError as e:
        raise HeadmasterError(f"{where}: 'web.listen': {e}") from None


def read_config(path: Path) -> Config:
    """Parse and validate one TOML file."""
    path = Path(path).expanduser().absolute()
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise HeadmasterError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise HeadmasterError(f"config path is a directory: {path}") from None
    except PermissionError:
        raise HeadmasterError(f"cannot read config file {path}: permission denied") from None
    except tomllib.TOMLDecodeError as e:
        raise HeadmasterError(f"config {path} is not valid TOML: {e}") from None
    return config_from_dict(data, path)


def find_config(path: str | os.PathLike | None = None, workspace: str | os.PathLike | None = None) -> Path | None:
    """The config file to use: `path`, else $HEADMASTER_CONFIG, else <workspace>/config.toml if it exists."""
    if path:
        return Path(path).expanduser().absolute()
    env = os.environ.get(CONFIG_ENV)
    if env:
        return Path(env).expanduser().absolute()
    candidate = Workspace.from_env(workspace).root / CONFIG_NAME
    return candidate if candidate.is_file() else None


def load_config(path: str | os.PathLike | None = None, workspace: str | os.PathLike | None = None) -> Config:
    """The configuration by the lookup order; defaults when no file is found.

    An explicitly named file (argument or $HEADMASTER_CONFIG) must exist.
    """
    found = find_config(path, workspace)
    if found is None:
        config = Config()
        if workspace:
            config.workspace = str(Path(workspace).expanduser().absolute())
        return config
    return read_config(found)


def config_init(path: str | os.PathLike, workspace: str | os.PathLike | None = None) -> Path:
    """Write a starting config (every key, default values) to `path`; never overwrites an existing file."""
    path = Path(path).expanduser().absolute()
    if path.exists():
        raise HeadmasterError(f"{path} already exists; edit it or remove it first")
    config = Config(workspace=str(Workspace.from_env(workspace).root))
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(path, "xb") as f:
            tomli_w.dump(config.to_dict(), f)
    except OSError as e:
        raise HeadmasterError(f"cannot write {path}: {e.strerror or e}") from None
    return path
