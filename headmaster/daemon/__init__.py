"""The daemon wing: hmd, a torch-free supervisor and a model worker that sleeps.

main.py           the hmd command; service.py, the Daemon that wires the parts below together
hub.py            what the Daemon's parts share: config, workspace, job queue, scheduler, worker, headmaster.db
events.py         the watcher's sink and the timers it arms (settle checks, debounced retrains)
calls.py          the job thread's worker calls, surviving crashes; the active model; embedding examples
retrain.py        a dirty head's retrain; sorter.py, sorting the inbox when its head can sort
corrections.py    learning from corrections and the review page's labels
answers.py        hmctl's commands and `hmctl status`
watcher.py        watchdog events from heads/, inbox/ and classified/, settled before they count
state.py          per-head dirty and retrain bookkeeping, counters
heartbeat.py      is the job thread moving? what the systemd watchdog ping is tied to
inbox.py          sorting the inbox: verdicts in, crash-safe moves out
control.py        the Unix socket hmctl talks to; protocol.py, the worker's JSON messages
worker_client.py  starting, calling and stopping the worker process
worker.py         the worker process: the only part that imports torch; LocalWorker, its operations in-process
logs.py           loguru to the journal or a file

It sits above every other wing (it never reaches into finetune); only the shells import it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from headmaster import lazy_exports

# name -> the module of this wing that defines it; imported on first use, so importing the wing costs nothing
_EXPORTS = {
    "LocalWorker": "worker",
    "request": "control",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from headmaster.daemon.control import request
    from headmaster.daemon.worker import LocalWorker

__getattr__ = lazy_exports(__name__, _EXPORTS)
