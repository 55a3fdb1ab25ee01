"""What a checkpoint says about itself (type, model, classes, sources, metrics), read without torch.

hmd's supervisor never imports torch, yet it decides whether a head needs retraining
and shows checkpoint facts in `hmctl status`. A checkpoint is torch's zip format: a
pickle (`<name>/data.pkl`) whose tensors point into separate storage records. This
reader unpickles that pickle with an allow-list even stricter than
`torch.load(weights_only=True)`: plain containers, `collections.OrderedDict`, and
torch's tensor-rebuild functions, which here build an opaque placeholder instead of
a tensor (no storage is read). Any other global in the file is refused, so no code
from the file ever runs. Loading a head for use still goes through
`checkpoint.read_checkpoint` (torch, weights_only=True) in the worker.

`CheckpointCache` keeps these facts per file until it changes, for status answers (hmd's
`hmctl status`, the review page's overview).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import threading
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from headmaster import HeadmasterError
from headmaster.workspace import LabelledSet

REQUIRED = ("type", "input_dim", "model", "model_state_dict", "classes")
SUGGEST_AUTO = 0.02  # hm status suggests --kind auto when the MLP trails another kind by more than this
MAX_PICKLE_BYTES = 64 * 1024 * 1024  # the metadata pickle of a head is a few kB; refuse absurd ones


class TensorStub:
    """Stands for a tensor (or storage) that was not loaded."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __repr__(self) -> str:
        return "<tensor not loaded>"


def _tensor_stub(*args: Any, **kwargs: Any) -> TensorStub:
    return TensorStub()


_ALLOWED = {("collections", "OrderedDict"): OrderedDict, ("builtins", "set"): set,
            ("builtins", "frozenset"): frozenset, ("builtins", "tuple"): tuple, ("builtins", "list"): list,
            ("builtins", "dict"): dict}


class _MetaUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" or module.startswith("torch."):
            # tensor rebuilders, storage types, dtypes: all become placeholders
            return _tensor_stub if not name.endswith("Storage") else TensorStub
        if (module, name) == ("_codecs", "encode"):  # how protocol 2 writes bytes objects
            return lambda text, encoding="latin1": text.encode(encoding)
        raise pickle.UnpicklingError(f"refusing global {module}.{name}")

    def persistent_load(self, pid: Any) -> TensorStub:
        return TensorStub()


def read_checkpoint_meta(path: Path) -> dict[str, Any]:
    """The checkpoint dictionary with every tensor replaced by a TensorStub; HeadmasterError if unreadable.

    Same checks and messages as `checkpoint.read_checkpoint`, so hmd and hm describe a damaged file alike.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            names = [n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
            if not names:
                raise HeadmasterError(f"cannot read checkpoint {path}: no data.pkl inside (not a torch checkpoint)")
            info = z.getinfo(names[0])
            if info.file_size > MAX_PICKLE_BYTES:
                raise HeadmasterError(f"cannot read checkpoint {path}: metadata too large ({info.file_size} bytes)")
            with z.open(info) as f:
                data = _MetaUnpickler(f).load()
    except FileNotFoundError:
        raise HeadmasterError(f"no checkpoint at {path}") from None
    except HeadmasterError:
        raise
    except zipfile.BadZipFile:
        raise HeadmasterError(f"cannot read checkpoint {path}: not a torch checkpoint (damaged or another kind of "
                              f"file)") from None
    except Exception as e:  # anything a damaged pickle can raise
        raise HeadmasterError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
                              if str(e) else f"cannot read checkpoint {path}: {type(e).__name__}") from None
    missing = [k for k in REQUIRED if not isinstance(data, dict) or k not in data]
    if missing:
        raise HeadmasterError(f"{path} is not a headmaster checkpoint (missing {', '.join(missing)})")
    return data


def checkpoint_version(path: Path, created_at: str | None) -> str:
    """A checkpoint's identity for records made against it: its created_at and the start of its SHA-256.
    created_at has whole seconds, so two trainings within one second differ only in the digest."""
    try:
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    except OSError:
        digest = ""
    return f"{created_at or ''} {digest}"


@dataclass
class CheckpointCache:
    """Checkpoint metadata for status answers, re-read only when the file changes."""

    entries: dict[Path, tuple[tuple[int, int], dict]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def summary(self, path: Path) -> dict | None:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        key = (st.st_mtime_ns, st.st_size)
        with self.lock:
            hit = self.entries.get(path)
            if hit and hit[0] == key:
                return hit[1]
        try:
            ck = read_checkpoint_meta(path)
        except HeadmasterError as e:
            summary = {"error": str(e)}
        else:
            meta = ck.get("metadata", {})
            summary = {"type": ck["type"], "kind": ck.get("kind", "mlp"), "model": ck["model"],
                       "classes": list(ck["classes"]),
                       "threshold": ck.get("threshold"), "min_confidence": ck.get("min_confidence"),
                       "created_at": meta.get("created_at"),
                       "metrics": meta.get("metrics", {}), "selection": meta.get("selection"),
                       "comparison": meta.get("comparison"), "error_goal": meta.get("error_goal"),
                       "version": checkpoint_version(path, meta.get("created_at"))}
        with self.lock:
            self.entries[path] = (key, summary)
        return summary


def head_fields(labelled: LabelledSet, ck: dict) -> dict:
    """What a status answer says about one head: its buckets and its checkpoint summary (`CheckpointCache.summary`)."""
    return {
        "type": ck.get("type", labelled.head_type),
        "kind": ck.get("kind"),
        "buckets": {b.name: len(b.images) for b in labelled.buckets},
        "images": labelled.image_count,
        "trained": "type" in ck,
        "last_trained": ck.get("created_at"),
        "model": ck.get("model"),
        "threshold": ck.get("threshold"),
        "metrics": ck.get("metrics", {}),
        "error": ck.get("error"),
        "error_goal": ck.get("error_goal"),  # hm train --max-error: the goal, the measured error and coverage
        "sorts": describe_goal(ck["error_goal"]) if ck.get("error_goal") else None,
        "selection": describe_selection(ck["selection"]) if ck.get("selection") else None,
        "suggestion": auto_suggestion(ck.get("kind") or "mlp", ck.get("comparison")),
    }


# -- what the metadata says, in words (hm status, hmctl status, the page) ---------------------------------------

def describe_goal(goal: dict[str, Any]) -> str:
    """'sorts ~87% of new photos with ≤ 2% wrong (out of fold)', or why it sorts nothing."""
    pct = f"{goal['max_error'] * 100:g}%"
    if not goal.get("reached"):
        return f"sorts nothing: no cut keeps errors ≤ {pct} (out of fold); every photo goes to uncertain/"
    return f"sorts ~{goal['coverage'] * 100:.0f}% of new photos with ≤ {pct} wrong (out of fold)"


def describe_selection(selection: dict[str, Any]) -> str:
    """'auto chose linear: 0.76 ± 0.02 out-of-fold; mlp 0.69, prototype 0.75'."""
    chosen, scores = selection.get("chosen", "?"), selection.get("scores") or {}
    if not scores:
        return f"auto chose {chosen}: {selection.get('reason') or 'nothing to compare'}"
    s = scores[chosen]
    hw = "" if s.get("half_width") is None else f" ± {s['half_width']:.2f}"
    others = ", ".join(f"{k} {v['mean']:.2f}" for k, v in scores.items() if k != chosen)
    return f"auto chose {chosen}: {s['mean']:.2f}{hw} out-of-fold" + (f"; {others}" if others else "")


def auto_suggestion(kind: str, selection: dict[str, Any] | None) -> str | None:
    """A hint when an MLP head trails another kind by more than SUGGEST_AUTO out of fold."""
    scores = (selection or {}).get("scores") or {}
    if kind != "mlp" or "mlp" not in scores:
        return None
    best_kind = max(scores, key=lambda k: scores[k]["mean"])
    gap = scores[best_kind]["mean"] - scores["mlp"]["mean"]
    if gap > SUGGEST_AUTO:
        return (f"{best_kind} beats this MLP by {gap * 100:.0f} points out of fold: "
                f"try `hm train --kind auto`")
    return None

