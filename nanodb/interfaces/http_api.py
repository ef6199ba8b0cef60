"""The JSON HTTP API: search by text, uploaded image or item index (or a combination); stats; thumbnails
and originals (a single byte range of one on request: a browser plays a video by ranges).

Every error is a JSON object {"error": "one line"} with a 4xx status; nothing a client sends can
make the server stop serving. The OpenAPI schema is at /openapi.json, browsable at /docs.
"""

from __future__ import annotations

import inspect
import logging
import mimetypes
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote

from fastapi import APIRouter, Depends, FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from pydantic import BaseModel, Field, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanodb.database import SearchResults
from nanodb.interfaces.search_service import (
    MAX_DUPLICATE_GROUPS,
    MAX_DUPLICATE_ITEMS,
    MAX_K,
    BadRequest,
    SearchService,
    TooLarge,
)
from nanodb.interfaces.thumbnails import NotServable, ThumbnailCache, item_links, open_original
from nanodb.media.video import frame_time
from nanodb.search.batcher import SearchBusy
from nanodb.search.request import COLLAPSE_HELP, FilterField, Filters
from nanodb.search.sharded import ShardUnavailable
from nanodb.storage.format import DatabaseError

log = logging.getLogger(__name__)

# Bounds are declared in the schema and checked by NanoDB.search, whose messages say what to send instead.
K_BOUNDS = {"minimum": 1, "maximum": MAX_K}
SIMILARITY_BOUNDS = {"minimum": -1.0, "maximum": 1.0}
# `k` defaults to the server's --k (setting `k`, 8 unless given), as in the console and NanoDB.search: the web
# UI asks for what its grid shows (its Results slider), so the API needs no default of its own.
K_HELP = f"number of results, 1..{MAX_K} (default: the server's --k, 8 unless it was given)"
K = Query(None, description=K_HELP, examples=[16], json_schema_extra=K_BOUNDS)
MIN_SIMILARITY = Query(-1.0, description="drop results less similar than this (cosine, -1..1)", examples=[0.2],
                       json_schema_extra=SIMILARITY_BOUNDS)
JPEG = {200: {"content": {"image/jpeg": {}}, "description": "a JPEG image"}}
TIME_HELP = "a video's frame: its moment, seconds from the video's start (null for a photo)"
LINK_HELP = ("its path on this server; null for an item without a file the server can send "
             "(added as a vector, or read from a URL or a tar shard)")
CHUNK = 1 << 16  # bytes read from an original at a time
ONE_RANGE = re.compile(r"bytes=\s*(\d{0,19})\s*-\s*(\d{0,19})\s*")


class Where(NamedTuple):
    """The filters and the collapse option of a search, as a client sent them."""

    filters: Filters
    collapse: bool

    def options(self) -> dict:
        """As SearchService's keyword arguments."""
        return {"filters": self.filters, "collapse": self.collapse}


def _http_type(f: FilterField) -> Any:
    return list[str] | None if f.choices else str | None


def _query_filters() -> Callable[..., Where]:
    """A FastAPI dependency reading the filters (each declared once, in search.request.Filters) and
    `collapse` from the query string."""
    params = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=_http_type(f),
                                default=Query(None, alias=None if f.flag == f.name else f.flag, description=f.help,
                                              examples=list(f.examples), max_length=f.max_length))
              for f in Filters.described()]
    params.append(inspect.Parameter("collapse", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                                    default=Query(False, description=COLLAPSE_HELP)))

    def where(collapse: bool, **filters) -> Where:
        return Where(Filters(**filters), collapse)

    where.__signature__ = inspect.Signature(params)
    return where


query_filters = _query_filters()
# The same filters in a JSON body: the fields of search.request.Filters, and `collapse`.
BodyFilters = create_model(
    "BodyFilters", collapse=(bool, Field(False, description=COLLAPSE_HELP)),
    **{f.name: (_http_type(f), Field(None, description=f.help, examples=list(f.examples), max_length=f.max_length))
       for f in Filters.described()})


class Result(BaseModel):
    index: int
    path: str | None
    similarity: float
    thumbnail: str | None = Field(description=LINK_HELP)
    original: str | None = Field(description=LINK_HELP)
    duplicates: list[int] = Field(default_factory=list, description="items with the same file content (collapse)")
    time: float | None = Field(None, description=TIME_HELP)


class SearchResponse(BaseModel):
    results: list[Result]
    items: int
    encode_ms: float
    search_ms: float


TEXT_HELP = ("words, or a combined query such as `dog + beach - snow` or `2:dog`; `#12` is stored item 12 "
             "(`#12 + night - 2:fence`); a path or URL is words: the server opens and fetches nothing a client names")
TERMS_HELP = "terms combined with the image, as in a text query: `- 3:cat + 2:bee`, `night`, `0.5:#12`"


class TextQuery(BodyFilters):
    q: str = Field(description=TEXT_HELP, examples=["a red car", "dog + beach - snow", "#12 + night"])
    k: int | None = Field(None, description=K_HELP, json_schema_extra=K_BOUNDS)
    min_similarity: float = Field(-1.0, description="drop results less similar than this (cosine, -1..1)",
                                  json_schema_extra=SIMILARITY_BOUNDS)

    def where(self) -> Where:
        return Where(Filters(**{f.name: getattr(self, f.name) for f in Filters.described()}), self.collapse)


class Scan(BaseModel):
    found: int
    done: int
    added: int
    updated: int
    failed: int
    walking: bool
    seconds: float


class Stats(BaseModel):
    items: int = Field(description="live items indexed")
    unsaved: int = Field(description="items added or deleted since the last save")
    model: str
    dim: int
    text_encode_ms: float | None = Field(description="latest text encoding time")
    image_encode_ms: float | None = Field(description="latest image encoding time")
    search_ms: float | None = Field(description="latest vector search time")
    searches: int
    scans: list[Scan] = Field(description="scans running now")


class ItemInfo(BaseModel):
    index: int
    path: str | None
    size: int
    mtime: float
    metadata: dict
    time: float | None = Field(None, description=TIME_HELP)


class DuplicateItem(BaseModel):
    index: int
    path: str | None
    similarity: float = Field(description="cosine similarity to the group's first item")
    thumbnail: str | None = Field(description=LINK_HELP)
    original: str | None = Field(description=LINK_HELP)
    time: float | None = Field(None, description=TIME_HELP)


class DuplicateGroupOut(BaseModel):
    size: int = Field(description="items in the group (its `items` are cut short past the answer's item limit)")
    items: list[DuplicateItem]


class DuplicatesResponse(BaseModel):
    threshold: float
    min_size: int
    total_groups: int = Field(description="groups found, of at least min_size items")
    total_items: int = Field(description="items in them")
    groups: list[DuplicateGroupOut] = Field(description=f"the largest groups first: at most `limit` groups and "
                                                        f"{MAX_DUPLICATE_ITEMS} items in all")
    truncated: bool = Field(description="some groups or items are left out of this answer")
    seconds: float = Field(description="time the computation took")
    cached: bool = Field(description="the last computation's result, for an unchanged database")


class Error(BaseModel):
    error: str


ERRORS = {400: {"model": Error}, 404: {"model": Error}, 413: {"model": Error}, 422: {"model": Error}}


def _response(outcome: SearchResults, items: int) -> SearchResponse:
    return SearchResponse(
        results=[
            Result(
                index=r.index,
                path=r.path,
                similarity=round(r.similarity, 5),
                **item_links(r.index, r.path),
                duplicates=r.duplicates,
                time=r.time,
            )
            for r in outcome
        ],
        items=items,
        encode_ms=round(outcome.encode_ms, 2),
        search_ms=round(outcome.search_ms, 2),
    )


def _chunks(f, start: int, length: int):
    """`length` bytes of the open file from `start`, read CHUNK at a time; the file closed after."""
    with f:
        f.seek(start)
        while length > 0 and (chunk := f.read(min(CHUNK, length))):
            length -= len(chunk)
            yield chunk


class RangeNotSatisfiable(ValueError):
    """A Range header that names no byte of the file (416)."""


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The one byte range `header` asks of a file of `size` bytes, as (first, last) inclusive; None for the
    whole file: no header, one the server ignores as RFC 9110 allows (several ranges, another unit, a
    malformed one). Raises RangeNotSatisfiable for a range past the end."""
    m = ONE_RANGE.fullmatch(header.strip()) if header else None
    if m is None or not (m[1] or m[2]):
        return None
    if not m[1]:  # the last N bytes
        if int(m[2]) == 0:
            raise RangeNotSatisfiable("an empty suffix range")
        return max(0, size - int(m[2])), size - 1
    first = int(m[1])
    last = int(m[2]) if m[2] else size - 1
    if m[2] and last < first:
        return None  # invalid: ignored
    if first >= size:
        raise RangeNotSatisfiable(f"the range starts past the file's {size} bytes")
    return first, min(last, size - 1)


def content_disposition(name: str) -> str:
    """`inline` with the file's name, safe for any characters in it (RFC 5987)."""
    return f"inline; filename*=utf-8''{quote(name)}"


def basic_auth(user: str, password: str):
    """A dependency that requires HTTP Basic auth (declared in the OpenAPI schema as `HTTPBasic`)."""
    scheme = HTTPBasic(realm="nanodb", auto_error=False)

    def check(credentials: HTTPBasicCredentials | None = Depends(scheme)) -> None:
        ok = credentials is not None and secrets.compare_digest(
            f"{credentials.username}:{credentials.password}".encode(), f"{user}:{password}".encode())
        if not ok:
            raise HTTPException(401, "log in with the user and password given to --auth",
                                headers={"WWW-Authenticate": 'Basic realm="nanodb"'})

    return check


def api_router(service: SearchService, thumbnails: ThumbnailCache,
               auth: tuple[str, str] | None = None) -> APIRouter:
    router = APIRouter(prefix="/api", responses=ERRORS,
                       dependencies=[Depends(basic_auth(*auth))] if auth else [])
    add_search_routes(router, service)
    add_item_routes(router, service, thumbnails)
    add_duplicate_routes(router, service)
    return router


def item_that_exists(db, index: int) -> int:
    if not db.has_item(index):
        raise NotServable(f"no item with index {index}")
    return index


def add_search_routes(router: APIRouter, service: SearchService) -> None:
    """Search by text (GET and POST), by an uploaded image, by a stored item."""
    db = service.db

    @router.get("/search/text", response_model=SearchResponse, summary="Search by text")
    def search_text(
        q: str = Query(..., description=TEXT_HELP, examples=["a red car"]),
        k: int | None = K,
        min_similarity: float = MIN_SIMILARITY,
        where: Where = Depends(query_filters),
    ):
        return _response(service.by_text(q, k, min_similarity, **where.options()), len(db))

    @router.post("/search/text", response_model=SearchResponse, summary="Search by text (long queries)")
    def search_text_post(body: TextQuery):
        return _response(service.by_text(body.q, body.k, body.min_similarity, **body.where().options()), len(db))

    @router.post("/search/image", response_model=SearchResponse, summary="Search by an uploaded image")
    async def search_image(
        file: UploadFile = File(..., description="an image file"),
        k: int | None = K,
        min_similarity: float = MIN_SIMILARITY,
        q: str = Query("", description=TERMS_HELP, examples=["- 3:cat + 2:bee"]),
        where: Where = Depends(query_filters),
    ):
        data = await file.read(service.max_upload_bytes + 1)
        outcome = await run_in_threadpool(lambda: service.by_image(data, k, min_similarity, **where.options(),
                                                                   terms=q))
        return _response(outcome, len(db))

    @router.get("/search/item/{index}", response_model=SearchResponse, summary="Items similar to a stored item")
    def search_item(index: int, k: int | None = K, min_similarity: float = MIN_SIMILARITY,
                    where: Where = Depends(query_filters)):
        return _response(service.by_item(item_that_exists(db, index), k, min_similarity, **where.options()), len(db))


def add_duplicate_routes(router: APIRouter, service: SearchService) -> None:
    """Near-duplicate groups: one computation at a time (another request meanwhile: 503, Retry-After);
    the last result is kept until the database changes."""
    db = service.db

    @router.get("/duplicates", response_model=DuplicatesResponse, summary="Groups of near-duplicate items",
                responses={503: {"model": Error, "description": "near-duplicates are being computed for another "
                                                                "request: retry after Retry-After seconds"}})
    def duplicates(
        threshold: float = Query(0.95, gt=0, le=1, description="the least similarity (cosine) of two "
                                 "near-duplicates, more than 0 and at most 1", examples=[0.95]),
        min_size: int = Query(2, ge=2, le=1_000_000, description="only groups of at least this many items"),
        limit: int = Query(MAX_DUPLICATE_GROUPS, ge=1, le=MAX_DUPLICATE_GROUPS,
                           description=f"groups returned, largest first, 1..{MAX_DUPLICATE_GROUPS}"),
    ):
        # a sync route: FastAPI runs it in its thread pool, off the event loop
        return service.duplicates.find(threshold).answer(db, min_size, limit)


def add_item_routes(router: APIRouter, service: SearchService, thumbnails: ThumbnailCache) -> None:
    """Stats, one item's record, its thumbnail and its original file."""
    db = service.db

    def exists(index: int) -> int:
        return item_that_exists(db, index)

    @router.get("/stats", response_model=Stats, summary="Items indexed, latest timings, running scans")
    def stats():
        return service.stats()

    @router.get("/items/{index}", response_model=ItemInfo, summary="One stored item")
    def item(index: int):
        it = db[exists(index)]
        return ItemInfo(index=index, path=it.path, size=it.size, mtime=it.mtime, metadata=it.metadata,
                        time=frame_time(it.metadata))

    @router.get("/items/{index}/thumbnail", response_class=FileResponse, responses=JPEG,
                summary="An item's JPEG thumbnail")
    def thumbnail(index: int):
        return FileResponse(thumbnails.get(index), media_type="image/jpeg",
                            headers={"Cache-Control": "private, max-age=86400"})  # HEAD: its headers alone

    @router.get("/items/{index}/original", response_class=StreamingResponse, summary="An item's original file",
                responses={200: {"content": {"image/*": {}, "video/*": {}}, "description": "the file as indexed"},
                           206: {"content": {"image/*": {}, "video/*": {}},
                                 "description": "the byte range asked for (a `Range: bytes=first-last` header)"},
                           416: {"model": Error, "description": "a range past the end of the file"}})
    def original(index: int, request: Request):
        f = open_original(db, index)  # checked against its content hash, then sent from this descriptor
        size, name = db[index].size, Path(db[index].path).name
        headers = {"Content-Disposition": content_disposition(name), "Accept-Ranges": "bytes"}
        try:  # a Range with If-Range is answered whole: the server sends no validator it could compare
            asked = None if "if-range" in request.headers else byte_range(request.headers.get("range"), size)
        except RangeNotSatisfiable as e:
            f.close()
            return JSONResponse({"error": f"{e}; ask for bytes 0-{size - 1}"}, status_code=416,
                                headers={"Content-Range": f"bytes */{size}"})
        first, last = asked or (0, size - 1)
        if asked is not None:
            headers["Content-Range"] = f"bytes {first}-{last}/{size}"
        headers["Content-Length"] = str(last - first + 1)
        status, media_type = 200 if asked is None else 206, mimetypes.guess_type(name)[0] or "application/octet-stream"
        if request.method == "HEAD":  # what GET would answer, without reading the file
            f.close()
            return Response(status_code=status, media_type=media_type, headers=headers)
        return StreamingResponse(_chunks(f, first, last - first + 1), status_code=status, media_type=media_type,
                                 headers=headers)

    # HEAD answers as GET does (headers, no body); left out of the schema, which lists each route once
    router.add_api_route("/items/{index}/thumbnail", thumbnail, methods=["HEAD"], include_in_schema=False)
    router.add_api_route("/items/{index}/original", original, methods=["HEAD"], include_in_schema=False)


def unknown_api_route(app: FastAPI) -> None:
    """Any other /api/... path answers nanodb's JSON 404 (not the web UI's), whatever the method."""

    @app.api_route("/api/{rest:path}", methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
                   include_in_schema=False)
    def unknown(rest: str, request: Request):
        return JSONResponse({"error": f"no API route {request.method} /api/{rest[:80]}; see /docs"},
                            status_code=404)


def install_error_handlers(app: FastAPI) -> None:
    """One-line JSON errors instead of stack traces or nested validation reports."""

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest):
        return JSONResponse({"error": str(exc)}, status_code=413 if isinstance(exc, TooLarge) else 400)

    @app.exception_handler(SearchBusy)
    async def busy(request: Request, exc: SearchBusy):  # too many searches waiting: the client retries
        return JSONResponse({"error": str(exc)}, status_code=503, headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(NotServable)
    async def not_servable(request: Request, exc: NotServable):
        return JSONResponse({"error": str(exc)}, status_code=exc.status_code)  # 404, or 403 (OutsideRoots)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):  # e.g. a body that is not JSON
        return JSONResponse({"error": " ".join(str(exc.detail).split())}, status_code=exc.status_code,
                            headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):  # the first error only, in one short line
        errors = exc.errors()
        first = errors[0] if errors else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:])[:80] or "request"
        value = first.get("input")
        shown = "" if value is None or isinstance(value, (dict, list)) else f" (got {str(value)[:40]!r})"
        message = " ".join(f"{where}: {first.get('msg', 'invalid')}".split())[:200]
        return JSONResponse({"error": message + shown}, status_code=422)

    @app.exception_handler(ShardUnavailable)
    async def shard_down(request: Request, exc: ShardUnavailable):  # a sharded database's node is down
        log.error("%s: %s", request.url.path, exc)
        return JSONResponse({"error": "a shard of the database is not answering (its node may be down): retry "
                                      "later"}, status_code=503, headers={"Retry-After": "30"})

    @app.exception_handler(NotImplementedError)
    async def not_here(request: Request, exc: NotImplementedError):  # e.g. near-duplicates of a sharded database
        return JSONResponse({"error": str(exc)}, status_code=501)

    @app.exception_handler(DatabaseError)
    async def damaged(request: Request, exc: DatabaseError):  # e.g. a data file truncated under the server
        log.error("%s: %s", request.url.path, exc)
        return JSONResponse({"error": "the database cannot be read: the server's log names the damaged file and "
                                      "the fix"}, status_code=503)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("error serving %s", request.url.path)
        return JSONResponse({"error": f"internal error ({type(exc).__name__}); the server keeps serving"},
                            status_code=500)
