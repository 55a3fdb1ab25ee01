"""The web wing: the review page, where people label by looking.

backend.py     the interface the page needs (ReviewBackend) and its plain data
review.py      that interface over one workspace (ReviewService); model work goes through a call it is given
app.py         the Starlette routes: server-rendered Jinja templates, plain forms, a JSON twin for every page
security.py    who may talk to the page: loopback or a token, the Host header, CSRF on every POST
server.py      uvicorn in a thread beside hmd's work, or in the foreground (hm serve)
thumbnails.py  small JPEGs of the images the page shows

It imports no torch and nothing of the daemon: whoever serves the page passes in what it needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from headmaster import lazy_exports

# name -> the module of this wing that defines it; imported on first use, so importing the wing costs nothing
_EXPORTS = {
    "ReviewService": "review",
    "WebError": "server",
    "WebServer": "server",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from headmaster.web.review import ReviewService
    from headmaster.web.server import WebError, WebServer

__getattr__ = lazy_exports(__name__, _EXPORTS)
