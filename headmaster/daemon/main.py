"""`hmd`: the headmaster daemon, in the foreground (systemd or launchd supervise it; it never forks away)."""

from __future__ import annotations

import faulthandler
import os
import signal
import sys

import click
from loguru import logger

from headmaster import HeadmasterError
from headmaster.config import load_config
from headmaster.daemon.logs import setup_logging

EXIT_CONFIG = 78  # sysexits.h EX_CONFIG: the config file is unusable


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Config file (default: $HEADMASTER_CONFIG, else <workspace>/config.toml, else defaults).")
@click.version_option(package_name="headmaster")
def hmd(config_path: str | None) -> None:
    """Watch the workspace: embed new examples, retrain heads, sort the inbox.

    Runs in the foreground until SIGTERM or SIGINT; SIGHUP reloads the config.
    Control it with `hmctl`.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1` dumps every thread's stack
    try:
        config = load_config(config_path)
        setup_logging(config)
    except HeadmasterError as e:  # a bad config: restarting will not help (systemd: RestartPreventExitStatus=78)
        click.echo(f"Error: {e}", err=True)
        sys.exit(EXIT_CONFIG)
    try:
        from headmaster.daemon.service import Daemon  # the supervisor: no torch; the model lives in the worker

        code = Daemon(config).run()
    except HeadmasterError as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(1)
    except OSError as e:  # e.g. an unwritable workspace: one line, not a traceback
        click.echo(f"Error: {e.strerror or e}{f': {e.filename}' if e.filename else ''}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(0)
    logger.complete()
    sys.exit(code)


def main() -> None:
    hmd(prog_name="hmd")


if __name__ == "__main__":
    main()
