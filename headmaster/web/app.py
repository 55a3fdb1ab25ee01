"""The review page: Starlette routes over a ReviewBackend, Jinja templates, a few KB of JS.

Every page has a JSON twin (`/heads/colour` and `/heads/colour.json`). State changes are
POSTs under /api/ (the guard checks their CSRF token): plain forms, answered with a redirect back to
the page, or JSON from the script, answered with JSON. Images are named by content hash.
Nothing here imports torch or the model code: the backend does the heavy work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, quote, urlencode

from jinja2 import Environment, FileSystemLoader, Undefined, select_autoescape
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from headmaster import HeadmasterError
from headmaster.web.backend import HASH_ID, Action, Item, LibraryQueue, NotFound, ReviewBackend
from headmaster.web.security import FORM_TYPE, SECURITY_HEADERS, Guard, GuardMiddleware
from headmaster.web.thumbnails import THUMBS_DIR, ThumbnailError, browser_type, cached_rendering, cached_thumbnail
from headmaster.workspace import MIN_BUCKET_IMAGES, is_image_name

HERE = Path(__file__).parent
QUEUE_PAGE = 60  # images rendered with the page; the script fetches more as the queue empties
SUSPECTS_PAGE = 20  # as `hm suspects --limit`
MAX_LIMIT = 1000
KEYS = "123456789"
VIEW_OF = {"example": "suspects", "library": "library"}  # an item's page by where it is; the rest: the queue


def create_app(backend: ReviewBackend, guard: Guard) -> Callable:
    """The ASGI app: routes behind the guard (Host, token and CSRF checks)."""
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]))
    env.filters["pct"] = lambda v: "—" if _missing(v) else f"{100 * float(v):.0f}%"
    env.filters["num"] = lambda v, d=2: "—" if _missing(v) else f"{float(v):.{d}f}"
    thumbs = backend.workspace_root / THUMBS_DIR

    def page(name: str, request: Request, **context: Any) -> HTMLResponse:
        html = env.get_template(name).render(request=request, csrf=guard.csrf, daemon=context.pop("daemon", False),
                                             **context)
        return HTMLResponse(html)

    def head_status(head: str) -> tuple[dict[str, Any], dict[str, Any]]:
        status = backend.status()
        if head not in status["heads"]:
            raise NotFound(f"unknown head '{head}'")
        return status, status["heads"][head]

    def buckets_of(info: dict[str, Any]) -> list[dict[str, str]]:
        return [{"name": b, "key": KEYS[i] if i < len(KEYS) else ""} for i, b in enumerate(info["buckets"])]

    # -- pages and their JSON twins ----------------------------------------------------------
    def overview(request: Request) -> Response:
        status = backend.status()
        return page("overview.html", request, status=status, daemon=status["daemon"])

    def overview_json(request: Request) -> Response:
        return JSONResponse(backend.status())

    def review(request: Request, view: str, library: str | None = None
               ) -> tuple[dict, dict, list[Item], int, LibraryQueue | None]:
        head = request.path_params["head"]
        status, info = head_status(head)
        limit = _limit(request, SUSPECTS_PAGE if view == "suspects" else QUEUE_PAGE)
        if view == "library":
            found = backend.library_queue(head, library or "", limit)
            return status, info, found.items, len(found.items), found
        if view == "queue":
            items = backend.queue(head, limit)
            return status, info, items, len(items), None
        return status, info, backend.suspects(head, limit), backend.suspects_total(head), None

    def render_cards(items: list[Item], info: dict[str, Any], view: str) -> str:
        return env.get_template("cards.html").render(items=items, buckets=buckets_of(info), view=view, csrf=guard.csrf)

    def review_page(view: str) -> Callable[[Request], Response]:
        def endpoint(request: Request) -> Response:
            error = request.query_params.get("error")
            name = request.path_params.get("library")
            head = request.path_params["head"]
            try:
                status, info, items, total, found = review(request, view, name)
            except HeadmasterError as e:  # the worker failed, too few images to score suspects: say so on the page
                status, info = head_status(head)
                items, total, found, error = [], 0, None, str(e)
            libraries = backend.libraries(head)
            return page("review.html", request, head=head, info=info, items=items,
                        total=total, view=view, buckets=buckets_of(info), daemon=status["daemon"], error=error,
                        notice=request.query_params.get("notice"), min_bucket=MIN_BUCKET_IMAGES,
                        libraries=libraries, library=found,
                        library_name=name, library_path=next((lib["path"] for lib in libraries
                                                              if lib["name"] == name), None))
        return endpoint

    def review_json(view: str) -> Callable[[Request], Response]:
        def endpoint(request: Request) -> Response:
            _, info, items, total, found = review(request, view, request.path_params.get("library"))
            out = {"head": request.path_params["head"], "view": view, "status": info,
                   "buckets": list(info["buckets"]), "items": [i.to_dict() for i in items], "total": total}
            if found is not None:
                out["library"] = found.to_dict()
            else:
                out["libraries"] = [lib["name"] for lib in backend.libraries(request.path_params["head"])]
            return JSONResponse(out)
        return endpoint

    def cards(request: Request) -> Response:
        view = request.query_params.get("view", "queue")
        if view not in ("queue", "suspects", "library"):
            raise NotFound(f"unknown view {view!r}")
        _, info, items, _, _ = review(request, view, request.query_params.get("library"))
        return HTMLResponse(render_cards(items, info, view))

    def details(request: Request) -> Response:
        head = request.path_params["head"]
        d = backend.details(head)
        return page("details.html", request, head=head, info=d["status"], figures=d["evaluation"],
                    buckets=buckets_of(d["status"]), daemon=backend.status()["daemon"])

    def details_json(request: Request) -> Response:
        return JSONResponse(backend.details(request.path_params["head"]))

    # -- images ------------------------------------------------------------------------------
    def thumbnail(request: Request) -> Response:
        id_ = _id(request.path_params["id"])
        source = backend.image_path(id_)
        try:
            path = cached_thumbnail(thumbs, id_, source)
        except ThumbnailError as e:
            raise NotFound(str(e)) from None
        return FileResponse(path, media_type="image/jpeg", headers={"cache-control": "private, max-age=86400"})

    def image(request: Request) -> Response:
        """The full-size view: the file itself where every browser shows its type, else a JPEG rendered from the
        decoded image (HEIC, AVIF, TIFF, camera RAW through its preview), made once per content."""
        id_ = _id(request.path_params["id"])
        source = backend.image_path(id_)
        kind = browser_type(source)
        if kind is not None:
            return FileResponse(source, media_type=kind, headers={"cache-control": "private, max-age=60"})
        if not is_image_name(source):
            raise NotFound("not an image")
        try:
            path = cached_rendering(thumbs, id_, source)  # a sync endpoint: Starlette runs it off the event loop
        except ThumbnailError as e:
            raise NotFound(str(e)) from None
        return FileResponse(path, media_type="image/jpeg", headers={"cache-control": "private, max-age=60"})

    # -- actions (POST, CSRF-checked by the guard): a plain form or JSON from the script ----------
    def action(fn: Callable[..., Action], *fields: str) -> Callable[[Request], Any]:
        async def endpoint(request: Request) -> Response:
            body, form = await _fields(request)
            try:
                args = [_id(_str(body, f)) if f == "id" else _str(body, f) for f in fields]
                done = await _threaded(fn, *args)
            except (HeadmasterError, NotFound, HTTPException) as e:
                if not form:
                    raise
                return _back(body, error=str(e.detail if isinstance(e, HTTPException) else e))
            if form:
                return _back(body, notice=done.note or _said(done))
            return JSONResponse({"action": done.to_dict()})
        return endpoint

    async def undo(request: Request) -> Response:
        body, form = await _fields(request)
        try:
            action: Action | None = await _threaded(backend.undo)
        except (HeadmasterError, NotFound) as e:
            if not form:
                raise
            return _back(body, error=str(e))
        if form:
            return _back(body, notice=_undone(action) if action else "Nothing to undo")
        if action is None:
            return JSONResponse({"action": None})
        item = backend.restore_item(action)
        card = None
        if item is not None:
            info = (await _threaded(head_status, item.head))[1]
            card = render_cards([item], info, VIEW_OF.get(item.where, "queue"))
        return JSONResponse({"action": action.to_dict(), "card": card})

    async def evaluate(request: Request) -> Response:
        figures = await _threaded(backend.evaluate, request.path_params["head"])
        return JSONResponse(figures)

    routes = [
        Route("/", overview),
        Route("/index.json", overview_json),
        Route("/heads/{head}.json", review_json("queue")),
        Route("/heads/{head}", review_page("queue")),
        Route("/heads/{head}/suspects.json", review_json("suspects")),
        Route("/heads/{head}/suspects", review_page("suspects")),
        Route("/heads/{head}/library/{library}.json", review_json("library")),
        Route("/heads/{head}/library/{library}", review_page("library")),
        Route("/heads/{head}/cards", cards),
        Route("/heads/{head}/details.json", details_json),
        Route("/heads/{head}/details", details),
        Route("/heads/{head}/evaluate", evaluate, methods=["POST"]),
        Route("/thumbs/{id}.jpg", thumbnail),
        Route("/images/{id}", image),
        Route("/api/label", action(backend.label, "head", "id", "bucket"), methods=["POST"]),
        Route("/api/new-bucket", action(backend.new_bucket, "head", "id", "name"), methods=["POST"]),
        Route("/api/skip", action(backend.skip, "head", "id"), methods=["POST"]),
        Route("/api/exclude", action(backend.exclude, "head", "id"), methods=["POST"]),
        Route("/api/undo", undo, methods=["POST"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={NotFound: _not_found, HTTPException: _http_error,
                                                       HeadmasterError: _refused})
    return GuardMiddleware(_SecurityHeaders(app), guard)


def _missing(value: Any) -> bool:
    return value is None or isinstance(value, Undefined)


class _SecurityHeaders:
    """CSP and friends on every response (no inline script, nothing from other origins)."""

    def __init__(self, app: Callable):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        async def with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, receive, with_headers if scope["type"] == "http" else send)


async def _threaded(fn: Callable, *args: Any) -> Any:
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(fn, *args)


def _wants_json(request: Request) -> bool:
    return request.url.path.endswith(".json") or request.url.path.startswith("/api/") or \
        "application/json" in request.headers.get("accept", "")


async def _not_found(request: Request, exc: Exception) -> Response:
    if _wants_json(request):
        return JSONResponse({"error": str(exc)}, status_code=404)
    return HTMLResponse(f"<!doctype html><title>Not found</title><p>{_escape(str(exc))}</p>"
                        f"<p><a href=\"/\">All heads</a></p>", status_code=404)


async def _refused(request: Request, exc: Exception) -> Response:
    """What the backend cannot do (a head not trained yet, a file that vanished): 409 with the reason."""
    return await _http_error(request, HTTPException(409, str(exc)))


async def _http_error(request: Request, exc: HTTPException) -> Response:
    if _wants_json(request):
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code)
    return HTMLResponse(f"<!doctype html><title>{exc.status_code}</title><p>{_escape(str(exc.detail))}</p>",
                        status_code=exc.status_code)


def _escape(text: str) -> str:
    from html import escape

    return escape(text)


def _limit(request: Request, default: int) -> int:
    raw = request.query_params.get("limit")
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise HTTPException(400, f"limit must be a whole number from 1 to {MAX_LIMIT}")
    return int(raw)


def _id(value: str) -> str:
    if not HASH_ID.match(value):
        raise NotFound(f"no image {value[:80]!r}")
    return value


async def _fields(request: Request) -> tuple[dict[str, Any], bool]:
    """The action's fields and whether they came from a plain form (which is answered with a redirect)."""
    if request.headers.get("content-type", "").split(";")[0].strip() == FORM_TYPE:
        fields = parse_qs((await request.body()).decode("utf-8", "replace"), keep_blank_values=True)
        return {k: v[0] for k, v in fields.items()}, True  # the standard library's parser: no multipart needed
    return await _json(request), False


def _back(body: dict[str, Any], **said: str) -> Response:
    """303 back to the page the form was on, with one line for it to show."""
    head = body.get("head") if isinstance(body.get("head"), str) else ""
    view, library = body.get("view"), body.get("library")
    path = "/" if not head else f"/heads/{quote(head, safe='')}"
    if head and view == "suspects":
        path += "/suspects"
    elif head and view == "library" and isinstance(library, str) and library:
        path += f"/library/{quote(library, safe='')}"
    return RedirectResponse(f"{path}?{urlencode(said)}", status_code=303)


def _said(action: Action) -> str:
    if action.kind == "skip":
        return f"skipped {action.name}"
    if action.kind == "exclude":
        return f"excluded {action.name}"
    if action.kind == "copy":
        return f"{action.bucket} ← {action.name} (a copy in {action.destination}; the photo stays in its library)"
    return f"{action.bucket} ← {action.name}"


def _undone(action: Action) -> str:
    if action.kind == "copy":
        return f"undone: {action.name} is no longer an example of {action.bucket}"
    return f"undone: {action.name} is back"


async def _json(request: Request) -> dict[str, Any]:
    if not await request.body():
        return {}  # undo needs no fields
    try:
        body = await request.json()
    except ValueError:
        raise HTTPException(400, "the body must be JSON") from None
    if not isinstance(body, dict):
        raise HTTPException(400, "the body must be a JSON object")
    return body


def _str(body: dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise HTTPException(400, f"'{key}' must be a non-empty string")
    return value
