"""The curation wing: what a person should look at, label or fix.

ranking.py   the images a head is least sure of, and the examples it doubts (hm rank, hm suspects)
libraryrank.py  a photo library's photos nearest a head's cut, from cached vectors (the page's library queue)
learning.py  corrections: a file moved between buckets becomes an example, logged and undoable; a library
             photo labelled on the page is copied in as one (learn_copy)
labels.py    importing labels from a CSV into bucket folders (hm import-labels)
sidecars.py  caption files written beside images (hm classify --sidecar)
xmp.py       XMP sidecars merged with headmaster's tags, everything else kept
tagging.py   tagging a photo library where it lives (hm tag): sidecars, and a record of what was written
tagrecords.py  that record (no model): what hmd reads to know which photos of a library are tagged
doctor.py    checking headmaster's own files and rebuilding a damaged cache (hm doctor)

It builds on heads and evaluation; it never serves a page or runs a daemon.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from headmaster import lazy_exports

# name -> the module of this wing that defines it; imported on first use, so importing the wing costs nothing
_EXPORTS = {
    "LibraryRanking": "libraryrank",
    "Learned": "learning",
    "NOT_LABELS": "learning",
    "TagOptions": "tagging",
    "check_bucket_name": "learning",
    "confirmable": "learning",
    "correction_counts": "learning",
    "corrections_log": "learning",
    "ensure_schema": "learning",
    "SKIP_FOLDERS": "tagrecords",
    "find_images": "tagrecords",
    "forget_gone": "tagrecords",
    "forget_tag_records": "tagrecords",
    "find_suspects": "ranking",
    "import_labels": "labels",
    "is_correction": "learning",
    "learn": "learning",
    "learn_copy": "learning",
    "near_cut_rows": "tagging",
    "nearest_the_cut": "tagging",
    "rank_folder": "ranking",
    "rank_library": "libraryrank",
    "rank_rows": "ranking",
    "rank_uncertain": "learning",
    "record_skip": "learning",
    "review_skips": "learning",
    "read_label_csv": "labels",
    "suspect_rows": "ranking",
    "tag_images": "tagging",
    "tagged_images": "tagrecords",
    "tag_library": "tagging",
    "unlearn": "learning",
    "unlearn_copy": "learning",
    "write_sidecars": "sidecars",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from headmaster.curation.labels import import_labels, read_label_csv
    from headmaster.curation.learning import (NOT_LABELS, Learned, check_bucket_name, confirmable, correction_counts,
                                              corrections_log, ensure_schema, is_correction, learn, learn_copy,
                                              rank_uncertain, record_skip, review_skips, unlearn, unlearn_copy)
    from headmaster.curation.libraryrank import LibraryRanking, rank_library
    from headmaster.curation.ranking import find_suspects, rank_folder, rank_rows, suspect_rows
    from headmaster.curation.sidecars import write_sidecars
    from headmaster.curation.tagging import TagOptions, near_cut_rows, nearest_the_cut, tag_images, tag_library
    from headmaster.curation.tagrecords import SKIP_FOLDERS, find_images, forget_gone, forget_tag_records, tagged_images

__getattr__ = lazy_exports(__name__, _EXPORTS)
