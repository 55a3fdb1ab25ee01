"""Tagging a photo library where it lives (hm tag): tags in sidecars photo tools read; the photos untouched.

Seed 003's tagger, for heads: every trained head scores each photo from one cached vector, and its
decision becomes a tag (heads.tags) written to photo.jpg.xmp (merged, never clobbered: curation.xmp),
and on request to a photo.txt caption and a photo.json record. Folders are walked recursively;
hidden files and folders are skipped, symlinks are not followed.

Every sidecar written is recorded in headmaster.db (the tables: curation/tagrecords.py): `tags` holds, per image and head, the content
hash, the checkpoint's created_at, the bucket and the tag written; `tag_sidecars` the hash, size and
mtime of each sidecar as we left it. A re-run (or hmd, later) skips an image whose decisions and
sidecars are unchanged without reading either, and replaces a .txt or .json only if we wrote it.

Never opens an image for writing; never deletes anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from tqdm import tqdm

from headmaster import HeadmasterError
from headmaster.curation.sidecars import sidecar_paths
from headmaster.curation.tagrecords import Found, ensure_tag_schema, find_images, previous_records, written_sidecars
from headmaster.curation.xmp import HeadRecord, SidecarError, merge_sidecar_tags, write_sidecar
from headmaster.embedding import Context, EmbedResult, Skipped, progress_enabled
from headmaster.fileops import fsync_dir, size_and_mtime, write_atomic
from headmaster.heads import (HeadRules, Tag, checkpoint_version, cut_margin, decide_with_cut, embed_for_scoring,
                              load_heads, score_vectors, tag_for)
from headmaster.store import Store

KINDS = ("xmp", "txt", "json")
XMP_NAMES = ("full", "base")  # photo.jpg.xmp (digiKam, darktable, Immich) or photo.xmp (Lightroom)
WRITE_THREADS = 4  # sidecar writes in flight: each waits on its fsync, not on the CPU
WRITE_BATCH = 256  # sidecars planned before they are written (their bytes held in memory meanwhile)


def ensure_schema(store: Store) -> None:
    ensure_tag_schema(store)


@dataclass
class TagOptions:
    xmp: bool = True
    txt: bool = False
    json: bool = False
    xmp_name: str = "full"  # full: photo.jpg.xmp; base: photo.xmp (photo.jpg.xmp where two photos share a stem)
    recursive: bool = True
    cuts: dict[str | None, float] = field(default_factory=dict)  # head -> cut; None: every binary head
    prefix: str = ""  # the caption's first words (seed 003's -p)
    dry_run: bool = False
    # hmd after a retrain: an image whose decisions are as last written (bar the checkpoint) keeps its
    # sidecars as they are; the check is recorded in `tag_checks`
    changed_decisions_only: bool = False

    def kinds(self) -> list[str]:
        return [k for k in KINDS if getattr(self, k)]


@dataclass(frozen=True)
class TagAction:
    image: Path
    sidecar: Path
    kind: str
    what: str  # written, updated, unchanged, kept (a .txt/.json not ours), unreadable, failed; 'would ...' dry
    added: tuple[str, ...] = ()  # tags (headmaster|...) this changes
    removed: tuple[str, ...] = ()
    note: str = ""  # the one line for kept, unreadable and failed


@dataclass
class TagReport:
    heads: list[str]
    found: Found
    tags: dict[Path, list[Tag]] = field(default_factory=dict)  # every scored image -> its tags
    actions: list[TagAction] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    embed: EmbedResult | None = None
    seconds: float = 0.0
    dry_run: bool = False

    @property
    def images_per_second(self) -> float:
        return len(self.tags) / self.seconds if self.seconds > 0 else 0.0

    def counts(self) -> dict[str, dict[str, int]]:
        """kind -> what -> count."""
        out: dict[str, Counter] = {}
        for a in self.actions:
            out.setdefault(a.kind, Counter())[a.what] += 1
        return {k: dict(v) for k, v in out.items()}

    def tag_counts(self) -> dict[str, int]:
        return dict(Counter(t.hierarchical for ts in self.tags.values() for t in ts))

    def problems(self) -> list[TagAction]:
        return [a for a in self.actions if a.note]


# -- the photos ------------------------------------------------------------------------------------

def trained_heads(ctx: Context) -> list[str]:
    """Every head with a checkpoint (hm tag's default)."""
    ws = ctx.workspace
    names = [h for h in ws.head_names() if ws.checkpoint_path(h).exists()]
    if not names:
        raise HeadmasterError("no trained heads: train one first (`hm train`)")
    return names


def check_cuts(cuts: dict[str | None, float], rules: dict[str, HeadRules]) -> dict[str, float]:
    """head -> the run's cut: `None` applies to every binary head; a named head must be in the run."""
    out: dict[str, float] = {}
    for head, cut in cuts.items():
        if not 0 <= cut <= 1:
            raise HeadmasterError(f"--threshold must be between 0 and 1, got {cut}")
        if head is not None and head not in rules:
            raise HeadmasterError(f"--threshold {head}={cut}: '{head}' is not one of the heads tagged "
                                  f"({', '.join(rules)})")
    for head, r in rules.items():
        if head in cuts:
            out[head] = cuts[head]
        elif None in cuts and r.type == "binary":
            out[head] = cuts[None]
    return out


# -- the records -----------------------------------------------------------------------------------

def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _created(rules: HeadRules) -> str:
    return str(rules.checkpoint.get("metadata", {}).get("created_at", ""))


def _version(ctx: Context, head: str, created: str) -> str:
    """What a record is written against (checkpoint_meta.checkpoint_version): two trainings within one second
    are still two versions, so a retrain always rewrites what it changed."""
    return checkpoint_version(ctx.workspace.trained_checkpoint(head), created)



# -- writing ---------------------------------------------------------------------------------------

def _caption(prefix: str, tags: list[Tag]) -> str:
    words = [w.strip() for w in prefix.split(",") if w.strip()]
    for t in tags:
        if t.keyword not in words:
            words.append(t.keyword)
    return ", ".join(words) + "\n"


def _record_json(image: Path, hash_: str, records: list[HeadRecord], probabilities: dict[str, dict]) -> str:
    doc = {"image": image.name, "sha256": hash_,
           "tags": [("|".join(("headmaster", *r.tag))) for r in records if r.tag],
           "heads": {r.head: {"prediction": r.bucket, "score": round(r.score, 6), "model": r.model,
                              "checkpoint": r.checkpoint,
                              "probabilities": {c: round(v, 6) for c, v in probabilities[r.head].items()}}
                     for r in records}}
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _plan_xmp(image: Path, sidecar: Path, records: list[HeadRecord]) -> tuple[TagAction, bytes | None]:
    """What writing this image's XMP would do, and the bytes to write (None: nothing to write)."""
    try:
        existing = _read(sidecar)
        data, before = merge_sidecar_tags(existing, records)
    except SidecarError as e:
        return TagAction(image, sidecar, "xmp", "unreadable", note=f"left as it is: cannot parse it ({e})"), None
    except OSError as e:
        return TagAction(image, sidecar, "xmp", "failed", note=f"cannot read it: {e.strerror or e}"), None
    old = {before[r.head] for r in records if before.get(r.head)}
    new = {"|".join(("headmaster", *r.tag)) for r in records if r.tag}
    added, removed = tuple(sorted(new - old)), tuple(sorted(old - new))
    if existing == data:
        return TagAction(image, sidecar, "xmp", "unchanged"), None
    return TagAction(image, sidecar, "xmp", "updated" if existing is not None else "written", added, removed), data


def _plan_text(image: Path, sidecar: Path, kind: str, text: str, ours: dict[str, tuple[str, int, int]]
               ) -> tuple[TagAction, bytes | None]:
    data = text.encode("utf-8")
    try:
        existing = _read(sidecar)
    except OSError as e:
        return TagAction(image, sidecar, kind, "failed", note=f"cannot read it: {e.strerror or e}"), None
    if existing is None:
        return TagAction(image, sidecar, kind, "written"), data
    if existing == data:
        return TagAction(image, sidecar, kind, "unchanged"), None
    recorded = ours.get(str(sidecar.absolute()))
    if recorded is None or recorded[0] != hashlib.sha256(existing).hexdigest():
        return TagAction(image, sidecar, kind, "kept", note="kept: not written by headmaster (or edited since)"), None
    return TagAction(image, sidecar, kind, "updated"), data


def _write(action: TagAction, data: bytes) -> TagAction:
    """Write one sidecar (its folder is fsynced later, once for all the files written into it)."""
    try:
        if action.kind == "xmp":
            write_sidecar(action.sidecar, data, sync_dir=False)
        else:
            write_atomic(action.sidecar, lambda f: f.write(data), sync_dir=False)
    except (HeadmasterError, OSError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        return TagAction(action.image, action.sidecar, action.kind, "failed", note=f"cannot write it: {reason}")
    return action


def tag_images(ctx: Context, images: list[Path], heads: list[str], options: TagOptions | None = None,
               found: Found | None = None) -> TagReport:
    """Score `images` with `heads` (one vector each, cache first) and write their tags to sidecars.

    What hmd calls with the files that changed. An image whose decisions, content and sidecars are as
    the last run left them is not touched (not even read). With `dry_run`, nothing is written or recorded.
    """
    options = options or TagOptions()
    started = time.perf_counter()
    if options.xmp_name not in XMP_NAMES:
        raise HeadmasterError(f"--xmp-name must be full or base, got '{options.xmp_name}'")
    kinds = options.kinds()
    if not kinds:
        raise HeadmasterError("nothing to write: give --xmp, --txt or --json")
    trained, model = load_heads(ctx, heads)
    rules = dict(trained)
    cuts = check_cuts(options.cuts, rules)
    report = TagReport(heads, found or Found(list(images)), dry_run=options.dry_run)
    vectors, result = embed_for_scoring(ctx, model, images, f"Tagging with {', '.join(heads)}")
    report.embed, report.skipped = result, list(result.skipped)
    per_head = {h: {d.path: d for d in score_vectors(t, images, vectors, result.hashes)} for h, t in trained}
    created = {h: _created(r) for h, r in rules.items()}
    versions = {h: _version(ctx, h, created[h]) for h in rules}  # what a record was written against

    names = {"xmp": (sidecar_paths(images, "xmp") if options.xmp_name == "base"
                     else {p: p.with_name(p.name + ".xmp") for p in images})}
    for kind in ("txt", "json"):
        if kind in kinds:
            names[kind] = sidecar_paths(images, kind)
    previous = previous_records(ctx.store, heads)
    ours = written_sidecars(ctx.store)
    tag_rows: list[tuple] = []
    check_rows: list[tuple] = []  # (path, head, hash, checkpoint, at): same decision, sidecars left alone
    sidecar_rows: list[tuple] = []
    pending: list[tuple[int, bytes]] = []  # (index in report.actions, bytes): written in parallel, WRITE_BATCH at a time
    waiting: list[tuple[list[int], list[tuple]]] = []  # an image's action indices, and its tags rows once they succeed

    def flush() -> None:
        with ThreadPoolExecutor(WRITE_THREADS, thread_name_prefix="hm-sidecar") as pool:  # fsync waits in parallel
            done = list(pool.map(lambda item: _write(report.actions[item[0]], item[1]), pending))
        for (i, data), action in zip(pending, done):
            report.actions[i] = action
            if not action.note:
                st = size_and_mtime(action.sidecar) or (len(data), 0)
                sidecar_rows.append((str(action.sidecar.absolute()), str(action.image.absolute()), action.kind,
                                     hashlib.sha256(data).hexdigest(), st[0], st[1], _now()))
        for folder in {report.actions[i].sidecar.parent for i, _ in pending}:
            fsync_dir(folder)  # the renames are durable before the database says they happened
        for indices, rows in waiting:
            if not any(report.actions[i].note for i in indices):  # a sidecar left alone: plan it again next time
                tag_rows.extend(rows)
        pending.clear()
        waiting.clear()

    scored = [p for p in images if p in vectors]
    quiet = not progress_enabled(ctx.options.progress) or len(scored) < 200  # a bar on long runs only
    bar = tqdm(total=len(scored), desc="Writing sidecars", unit="img", disable=quiet, leave=False)
    for image in scored:
        key = str(image.absolute())
        hash_ = result.hashes[image]
        records, tags, probabilities = [], [], {}
        for head in heads:
            d = per_head[head][image]
            bucket, score = decide_with_cut(rules[head], d.probabilities, d.bucket, d.score, cuts.get(head))
            tag = tag_for(head, rules[head], bucket)
            records.append(HeadRecord(head, bucket, tag.path if tag else None, model.name, score, created[head]))
            probabilities[head] = d.probabilities
            if tag:
                tags.append(tag)
        report.tags[image] = tags
        state = [(hash_, versions[r.head], cuts.get(r.head), r.bucket, "|".join(("headmaster", *r.tag)) if r.tag
                  else "") for r in records]
        sidecars = {kind: names[kind][image] for kind in kinds}
        same = all(previous.get((key, r.head)) == s for r, s in zip(records, state))
        if same and all((rec := ours.get(str(sc.absolute()))) is not None and size_and_mtime(sc) == rec[1:]
                        for sc in sidecars.values()):
            report.actions.extend(TagAction(image, sc, kind, "unchanged") for kind, sc in sidecars.items())
            bar.update(1)
            continue
        if options.changed_decisions_only and all(
                (p := previous.get((key, r.head))) is not None and (p[0], *p[2:]) == (s[0], *s[2:])
                for r, s in zip(records, state)) and all(
                (rec := ours.get(str(sc.absolute()))) is not None and size_and_mtime(sc) == rec[1:] for sc in sidecars.values()):
            report.actions.extend(TagAction(image, sc, kind, "unchanged") for kind, sc in sidecars.items())
            if not options.dry_run:
                check_rows.extend((key, r.head, hash_, versions[r.head], _now()) for r in records)
            bar.update(1)
            continue
        indices = []
        for kind, sidecar in sidecars.items():
            if kind == "xmp":
                action, data = _plan_xmp(image, sidecar, records)
            elif kind == "txt":
                action, data = _plan_text(image, sidecar, kind, _caption(options.prefix, tags), ours)
            else:
                action, data = _plan_text(image, sidecar, kind, _record_json(image, hash_, records, probabilities),
                                          ours)
            if data is not None and options.dry_run:
                action = TagAction(image, sidecar, kind, f"would {'write' if action.what == 'written' else 'update'}",
                                   action.added, action.removed)
            elif data is not None:
                pending.append((len(report.actions), data))
            elif action.what == "unchanged" and not options.dry_run:
                st = size_and_mtime(sidecar)
                if st is not None:  # ours or identical to ours: remember it, so the next run need not read it
                    sidecar_rows.append((str(sidecar.absolute()), key, kind, hashlib.sha256(_read(sidecar) or b"")
                                         .hexdigest(), st[0], st[1], _now()))
            indices.append(len(report.actions))
            report.actions.append(action)
        if not options.dry_run:
            waiting.append((indices, [(key, r.head, *s[:2], model.name, s[2], s[3], r.score, s[4], _now())
                                      for r, s in zip(records, state)]))
        if len(pending) >= WRITE_BATCH:
            flush()
        bar.update(1)
    flush()
    bar.close()
    if tag_rows or sidecar_rows or check_rows:
        _save(ctx.store, tag_rows, sidecar_rows, check_rows)
    report.seconds = time.perf_counter() - started
    return report


def _save(store: Store, tag_rows: list[tuple], sidecar_rows: list[tuple], check_rows: list[tuple] = ()) -> None:
    with store.conn:
        store.conn.execute("BEGIN IMMEDIATE")
        store.conn.executemany("INSERT OR REPLACE INTO tags (path, head, hash, checkpoint, model, cut, bucket, score, "
                               "tag, at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", tag_rows)
        store.conn.executemany("INSERT OR REPLACE INTO tag_sidecars (sidecar, image, kind, sha256, size, mtime_ns, "
                               "at) VALUES (?, ?, ?, ?, ?, ?, ?)", sidecar_rows)
        store.conn.executemany("INSERT OR REPLACE INTO tag_checks (path, head, hash, checkpoint, at) "
                               "VALUES (?, ?, ?, ?, ?)", check_rows)


def tag_library(ctx: Context, sources: list[Path], heads: list[str] | None = None,
                options: TagOptions | None = None) -> TagReport:
    """hm tag: find the images under `sources` and tag them with `heads` (default: every trained head)."""
    options = options or TagOptions()
    started = time.perf_counter()
    if not sources:
        raise HeadmasterError("give at least one file or folder to tag")
    heads = heads or trained_heads(ctx)
    found = find_images(sources, options.recursive)
    report = tag_images(ctx, found.images, heads, options, found)
    report.seconds = time.perf_counter() - started
    return report


# -- the photos nearest the cut --------------------------------------------------------------------

@dataclass(frozen=True)
class NearCut:
    image: Path
    head: str
    bucket: str  # the decision (with the run's cut), possibly 'uncertain'
    score: float
    margin: float  # distance to the cut: smaller is less sure


def nearest_the_cut(ctx: Context, sources: list[Path], heads: list[str] | None = None,
                    options: TagOptions | None = None, limit: int | None = 20) -> tuple[list[NearCut], list[Skipped]]:
    """hm tag --uncertain: the photos each head is least sure of, nearest the cut first; writes nothing."""
    options = options or TagOptions()
    heads = heads or trained_heads(ctx)
    images = find_images(sources, options.recursive).images
    trained, model = load_heads(ctx, heads)
    rules = dict(trained)
    cuts = check_cuts(options.cuts, rules)
    vectors, result = embed_for_scoring(ctx, model, images, f"Scoring with {', '.join(heads)}")
    out: list[NearCut] = []
    for head, t in trained:
        for d in score_vectors(t, images, vectors, result.hashes):
            bucket, score = decide_with_cut(t, d.probabilities, d.bucket, d.score, cuts.get(head))
            out.append(NearCut(d.path, head, bucket, score, cut_margin(t, d.probabilities, cuts.get(head))))
    out.sort(key=lambda n: (n.margin, str(n.image), n.head))  # ties: path order, stable output
    return (out[:limit] if limit else out), result.skipped


def near_cut_rows(near: list[NearCut], root: Path | None = None) -> list[dict]:
    rows = []
    for i, n in enumerate(near, 1):
        shown = os.path.relpath(n.image, root) if root else str(n.image)
        rows.append({"rank": i, "image": shown, "head": n.head, "decision": n.bucket, "score": n.score,
                     "margin": n.margin})
    return rows

