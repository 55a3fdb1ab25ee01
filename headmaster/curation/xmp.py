"""XMP sidecars (photo.jpg.xmp) merged with headmaster's tags: read, merge, write; never clobbered.

Tags go in the three fields photo tools read: dc:subject (flat keywords), lr:hierarchicalSubject
(headmaster|clothing|hat) and digiKam:TagsList (headmaster/clothing/hat). headmaster's own record
(per head: bucket, tag, model, score, checkpoint date, and the flat keyword it added) lives in a
namespace of our own, `headmaster:Heads`.

Merging keeps every field and every keyword headmaster did not write. For the heads of this run:
hierarchical tags under headmaster|<head> are ours (recognised by the prefix); a flat keyword is ours
only if our record says we added it (a keyword the user already had is never recorded, so never
removed). Other heads' tags and records stay as they were.

Written through python-exiv2 (GPL-3; libexiv2 is GPL-2+). libexiv2 does NOT raise on malformed XML
in a sidecar: it logs and returns an empty packet, and rewriting that would wipe the user's file, so
decode_sidecar pre-parses with ElementTree and cross-checks. The image itself is never opened.
"""

from __future__ import annotations

import os
import re
import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from headmaster import HeadmasterError
from headmaster.fileops import write_atomic

NS_URI = "https://headmaster.invalid/ns/1.0/"
NS_PREFIX = "headmaster"
ROOT = "headmaster"  # heads.TAG_ROOT: the root of our keyword hierarchy
SUBJECT, HIERARCHY, TAGS_LIST = "Xmp.dc.subject", "Xmp.lr.hierarchicalSubject", "Xmp.digiKam.TagsList"
HEADS = "Xmp.headmaster.Heads"
RECORD_FIELDS = ("head", "bucket", "tag", "model", "score", "checkpoint", "added")
_RDF = "{http://www.w3.org/1999/02/22-rdf-syntax-ns#}"
_RECORD_KEY = re.compile(r"^Xmp\.headmaster\.Heads\[(\d+)\]/headmaster:(\w+)$")

# libexiv2's XMP toolkit keeps process-wide state (the namespace registry; decoding registers unknown
# namespaces); initialising it is not thread-safe: one lock around every use
_lock = threading.Lock()
_ready = False


class SidecarError(Exception):
    """The existing sidecar cannot be parsed: leave it as it is; str(error) is the reason."""


@dataclass(frozen=True)
class HeadRecord:
    """What one head decided for one photo, as stored in headmaster:Heads."""

    head: str
    bucket: str  # the decided bucket, or 'uncertain'
    tag: tuple[str, ...] | None  # its path below ROOT: ("clothing", "hat"), ("nsfw",); None: no tag
    model: str
    score: float
    checkpoint: str  # the checkpoint's created_at


def _exiv2():
    global _ready
    import exiv2

    if not _ready:
        exiv2.XmpParser.initialize()
        exiv2.XmpProperties.registerNs(NS_URI, NS_PREFIX)
        exiv2.LogMsg.setLevel(exiv2.LogMsg.Level.error)  # its warnings go to the `exiv2` logger
        _ready = True
    return exiv2


def _items(xmp, key: str) -> list[str]:
    exiv2 = _exiv2()
    it = xmp.findKey(exiv2.XmpKey(key))
    if it == xmp.end():
        return []
    value = it.value()
    return [value.toString(i) for i in range(value.count())]


def _erase(xmp, keep=lambda key: False, prefix: str | None = None, key: str | None = None) -> None:
    for k in [d.key() for d in xmp]:
        if (k == key or (prefix and k.startswith(prefix))) and not keep(k):
            exiv2 = _exiv2()
            it = xmp.findKey(exiv2.XmpKey(k))
            if it != xmp.end():
                xmp.erase(it)


def _has_properties(root: ET.Element) -> bool:
    """True if an ElementTree-parsed XMP packet holds at least one property."""
    for desc in root.iter(_RDF + "Description"):
        if len(desc) or any(not k.startswith(_RDF) for k in desc.attrib):
            return True
    return False


def decode_sidecar(data: bytes):
    """(exiv2 image, its XmpData) of a sidecar's bytes; SidecarError if it cannot be used safely."""
    try:
        root = ET.fromstring(data)  # expat: no external entities
    except ET.ParseError as e:
        raise SidecarError(f"not well-formed XML ({e})") from None
    exiv2 = _exiv2()
    try:
        image = exiv2.ImageFactory.open(data)
        image.readMetadata()
    except exiv2.Exiv2Error as e:
        raise SidecarError(f"exiv2: {e.args[-1] if e.args else e}") from None
    if image.imageType() != exiv2.ImageType.xmp:
        raise SidecarError("not an XMP packet")
    xmp = image.xmpData()  # a reference into `image`: the caller keeps `image` alive while using it
    if xmp.count() == 0 and _has_properties(root):
        raise SidecarError("exiv2 could not decode the XMP packet")
    return image, xmp


def read_records(xmp) -> dict[str, dict[str, str]]:
    """head -> its headmaster:Heads fields, as strings."""
    by_index: dict[int, dict[str, str]] = {}
    for d in xmp:
        m = _RECORD_KEY.match(d.key())
        if m:
            by_index.setdefault(int(m.group(1)), {})[m.group(2)] = d.toString()
    return {r["head"]: r for _, r in sorted(by_index.items()) if r.get("head")}


def sidecar_tags(existing: bytes) -> dict[str, str]:
    """head -> the tag headmaster last wrote for it (headmaster|clothing|hat; '' for none)."""
    with _lock:
        image, xmp = decode_sidecar(existing)
        tags = {h: r.get("tag", "") for h, r in read_records(xmp).items()}
        del image
    return tags


def merge_sidecar(existing: bytes | None, records: Iterable[HeadRecord]) -> bytes:
    """New sidecar bytes: everything not ours kept, the tags of `records`' heads replaced by theirs.

    Raises SidecarError if `existing` cannot be parsed (the caller leaves that file alone).
    """
    return merge_sidecar_tags(existing, records)[0]


def merge_sidecar_tags(existing: bytes | None, records: Iterable[HeadRecord]) -> tuple[bytes, dict[str, str]]:
    """merge_sidecar, and what sidecar_tags said of `existing` (head -> our previous tag), from one decode."""
    records = sorted(records, key=lambda r: r.head)
    run = {r.head for r in records}
    with _lock:
        exiv2 = _exiv2()
        image, xmp = decode_sidecar(existing) if existing else (None, exiv2.XmpData())
        old = read_records(xmp)
        previous = {h: r.get("tag", "") for h, r in old.items()}
        kept = {h: r for h, r in old.items() if h not in run}
        ours_before = {r["added"] for r in old.values() if r.get("added")}

        # flat keywords: the user's (everything we did not add), then what our heads want, once
        user = [s for s in _items(xmp, SUBJECT) if s not in ours_before]
        wanted: dict[str, str] = {}  # head -> keyword
        for h, r in kept.items():
            if r.get("tag"):
                wanted[h] = r["tag"].split("|")[-1]
        for r in records:
            if r.tag:
                wanted[r.head] = r.tag[-1]
        subject = user + list(dict.fromkeys(k for k in wanted.values() if k not in user))

        def mine(item: str, sep: str) -> bool:
            return any(item == f"{ROOT}{sep}{h}" or item.startswith(f"{ROOT}{sep}{h}{sep}") for h in run)

        hier = [s for s in _items(xmp, HIERARCHY) if not mine(s, "|")]
        tags = [s for s in _items(xmp, TAGS_LIST) if not mine(s, "/")]
        for r in records:
            if r.tag:
                for items, sep in ((hier, "|"), (tags, "/")):
                    item = sep.join((ROOT, *r.tag))
                    if item not in items:
                        items.append(item)

        for key in (SUBJECT, HIERARCHY, TAGS_LIST):
            _erase(xmp, key=key)
        _erase(xmp, prefix="Xmp.headmaster.")
        if subject:
            xmp[SUBJECT] = exiv2.XmpArrayValue(subject, exiv2.TypeId.xmpBag)
        if hier:
            xmp[HIERARCHY] = exiv2.XmpArrayValue(hier, exiv2.TypeId.xmpBag)
        if tags:
            xmp[TAGS_LIST] = exiv2.XmpArrayValue(tags, exiv2.TypeId.xmpSeq)

        rows: dict[str, dict[str, str]] = dict(kept)
        for r in records:
            rows[r.head] = {"head": r.head, "bucket": r.bucket, "tag": "|".join((ROOT, *r.tag)) if r.tag else "",
                            "model": r.model, "score": f"{r.score:.4f}", "checkpoint": r.checkpoint}
        for h, row in rows.items():
            keyword = wanted.get(h)
            row["added"] = keyword if keyword and keyword not in user else ""
        if rows:
            container = exiv2.XmpTextValue()
            container.setXmpArrayType(exiv2.XmpValue.XmpArrayType.xaSeq)
            xmp[HEADS] = container
            for i, h in enumerate(sorted(rows), 1):
                for name in RECORD_FIELDS:
                    if rows[h].get(name):
                        xmp[f"{HEADS}[{i}]/headmaster:{name}"] = rows[h][name]
        rc, packet = exiv2.XmpParser.encode(xmp, 0, 0)
        del image
    if rc != 0:
        raise SidecarError(f"exiv2 could not encode the packet (rc {rc})")
    # libexiv2 pads a packet with ~2 KiB of spaces for in-file editing; a sidecar needs none
    return re.sub(r"\s+(<\?xpacket end=)", r"\n\1", packet).encode("utf-8"), previous


def write_sidecar(path: Path, data: bytes, sync_dir: bool = True) -> None:
    """Replace (or create) the sidecar atomically: temp file in the same folder, fsync, rename (and the
    folder's fsync unless the caller does it once for many files: `sync_dir=False`)."""
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = None

    def write(f) -> None:
        f.write(data)
        if mode is not None:  # the user's permission bits stay
            os.fchmod(f.fileno(), mode)

    try:
        write_atomic(path, write, sync_dir=sync_dir)
    except OSError as e:
        raise HeadmasterError(f"cannot write {path.name}: {e.strerror or e}") from None
