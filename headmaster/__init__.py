"""headmaster: folders of images in, classifiers out.

The house (docs/architecture.md has the map): foundations at the top level (store, workspace, config,
fileops), wings above them in the order the work flows (embedding -> heads -> evaluation, curation ->
web -> daemon; finetune beside them), the shells on top (cli.py is `hm`, ctl.py is `hmctl`). Imports run
one way, down.

This module holds the one exception type every wing raises, and nothing that imports anything.
"""


class HeadmasterError(Exception):
    """A user-facing error: bad input, missing model, invalid head, ...

    The CLI prints its message as one line and exits non-zero; the daemon logs it and counts it.
    Anything else escaping is a bug in headmaster.
    """
