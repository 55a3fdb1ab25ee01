"""Logging for hmd: loguru to stderr (systemd's journal and launchd pick it up), optionally a rotating file."""

from __future__ import annotations

import sys

from loguru import logger

from headmaster import HeadmasterError
from headmaster.config import Config

STDERR_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} {level: <7} {message}"


def setup_logging(config: Config) -> None:
    """(Re)configure every sink from the config; safe to call again on reload."""
    logger.remove()
    level = config.daemon.log_level.upper()
    logger.add(sys.stderr, level=level, format=STDERR_FORMAT, backtrace=False, diagnose=False)
    path = config.log_path
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            logger.add(str(path), level=level, format=STDERR_FORMAT, rotation=config.daemon.log_rotation,
                       retention=config.daemon.log_retention, enqueue=True, backtrace=False, diagnose=False)
        except (ValueError, TypeError) as e:
            raise HeadmasterError(f"config: 'daemon.log_rotation' {config.daemon.log_rotation!r} is not a "
                                  f"rotation loguru understands ({e})") from None
        except OSError as e:
            raise HeadmasterError(f"config: 'daemon.log_file' {path} cannot be opened: {e.strerror or e}") from None
