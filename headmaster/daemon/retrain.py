"""The retrain schedule's work, on the job thread: a dirty head, once quiet, is embedded, trained and sorts again.

A head is marked dirty by its examples' events (headmaster/daemon/events.py) and its retrain
is debounced there; when the timer fires, `Retrainer.retrain` waits on while files are still
arriving (up to `max_delay_seconds`), skips a head whose checkpoint is fresh, never trains
over a damaged checkpoint unless asked (`hmctl retrain`), and sorts the head's inbox after (then
the photo libraries that use the head are queued for a re-tag).
"""

from __future__ import annotations

import time
from typing import Callable

from loguru import logger

from headmaster import HeadmasterError
from headmaster.daemon.calls import Calls
from headmaster.daemon.events import Events
from headmaster.daemon.hub import Hub
from headmaster.daemon.sorter import Sorter
from headmaster.daemon.state import needs_retrain


class Retrainer:
    def __init__(self, hub: Hub, events: Events, calls: Calls, sorter: Sorter,
                 on_trained: Callable[[str], None] | None = None):
        self.on_trained = on_trained  # a head was trained: its libraries are re-tagged (daemon/library.py)
        self.hub = hub
        self.events = events
        self.calls = calls
        self.sorter = sorter

    def retrain(self, head: str, force: bool) -> None:
        hub = self.hub
        if head not in hub.ws.head_names():
            with hub.state.lock:
                hub.state.heads.pop(head, None)
            return
        (hub.inbox_dir / head).mkdir(parents=True, exist_ok=True)
        with hub.state.lock:
            h = hub.state.head(head)
            first = h.first_change
        cap = hub.config.daemon.max_delay_seconds
        if not force and hub.settler.pending_under(hub.ws.heads_dir / head) and first is not None \
                and time.monotonic() - first < cap:
            self.events.mark_dirty(head)  # files still arriving: wait for quiet (the max delay still holds)
            return
        hub.state.begin_retrain(head)
        model = self.calls.model()
        if model is None:
            return
        if self.sorter.checkpoint_damaged(head):
            if not force:
                return  # never trained over without the user asking (`hmctl retrain`, `hm train`)
            self.sorter.set_damaged_checkpoint_aside(head)
        if not force:
            fresh = needs_retrain(hub.ws, head, model.name)
            if not fresh.retrain:
                logger.info("head {}: {}: not retraining", head, fresh.reason)
                return
        labelled = hub.ws.head(head)
        errors, _ = labelled.problems()
        if errors:
            with hub.state.lock:
                h.last_error = "; ".join(errors)
            hub.tell_once(f"cannot-train:{head}:{h.last_error}", f"head {head} cannot train yet: {h.last_error}")
            return
        t = hub.config.training
        # examples that crash the worker are found one by one here and skipped by training
        self.calls.embed(model, [p for p, _ in labelled.labelled_images()], head)
        hub.set_activity(f"training {head}")
        with hub.state.lock:
            h.training = True
        started = time.perf_counter()
        try:
            report = self.calls.call("train", head=head, epochs=t.epochs, lr=t.lr, seed=t.seed, kind=t.kind,
                                     max_error=t.max_error)  # the config hmd runs with, kept across retrains
        except HeadmasterError as e:
            with hub.state.lock:
                h.last_error = str(e)
            raise
        finally:
            with hub.state.lock:
                h.training = False
        with hub.state.lock:
            h.retrains += 1
            h.last_error = None
        m = report["metrics"]
        score = f"F1 {m['f1']:.2f}" if "f1" in m else f"accuracy {m.get('accuracy', 0):.2f}"
        logger.success("trained {} ({}, {} images) in {:.1f}s: {}", head, report["head_type"], report["images"],
                       time.perf_counter() - started, score)
        self.sorter.sort_inbox(head)
        if self.on_trained is not None:
            self.on_trained(head)
