"""headmaster: folders of images in, classifiers out.

The house (docs/architecture.md has the map): foundations at the top level (store, workspace, config,
fileops), wings above them in the order the work flows (embedding -> heads -> evaluation, curation ->
web -> daemon; finetune beside them), the shells on top (cli.py is `hm`, ctl.py is `hmctl`). Imports run
one way, down.

This module holds the one exception type every wing raises and the lazy name tables the wings export
through (`lazy_exports`); it imports nothing at import time.
"""


class HeadmasterError(Exception):
    """A user-facing error: bad input, missing model, invalid head, ...

    The CLI prints its message as one line and exits non-zero; the daemon logs it and counts it.
    Anything else escaping is a bug in headmaster.
    """


def lazy_exports(package: str, exports: dict[str, str]):
    """A wing's module `__getattr__` (PEP 562): `from headmaster.<wing> import name` imports the one module of
    the wing that defines `name` (`exports`: name -> module), on first use, so importing a wing costs nothing."""
    import importlib
    import sys

    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
