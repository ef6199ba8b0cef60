"""The JSON HTTP API: search by text, uploaded image or item index; stats; thumbnails and originals.

Every error is a JSON object {"error": "one line"} with a 4xx status; nothing a client sends can
make the server stop serving. The OpenAPI schema is at /openapi.json, browsable at /docs.
"""

from __future__ import annotations

import logging
import mimetypes
from pathlib import Path
from urllib.parse import quote

from fastapi import APIRouter, FastAPI, File, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanodb.database import SearchResults
from nanodb.interfaces.search_service import MAX_K, BadRequest, SearchService, TooLarge
from nanodb.interfaces.thumbnails import NotServable, ThumbnailCache, open_original

log = logging.getLogger(__name__)

K = Query(64, description=f"number of results, 1..{MAX_K}")
MIN_SIMILARITY = Query(-1.0, description="drop results less similar than this (cosine, -1..1)")


class Result(BaseModel):
    index: int
    path: str | None
    similarity: float
    thumbnail: str
    original: str


class SearchResponse(BaseModel):
    results: list[Result]
    items: int
    encode_ms: float
    search_ms: float


class TextQuery(BaseModel):
    q: str = Field(description="words, or a combined query such as `dog + beach - snow` or `2:dog`")
    k: int = Field(64, description=f"number of results, 1..{MAX_K}")
    min_similarity: float = Field(-1.0, description="drop results less similar than this (cosine, -1..1)")


class ItemInfo(BaseModel):
    index: int
    path: str | None
    size: int
    mtime: float
    metadata: dict


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
                thumbnail=f"/api/items/{r.index}/thumbnail",
                original=f"/api/items/{r.index}/original",
            )
            for r in outcome
        ],
        items=items,
        encode_ms=round(outcome.encode_ms, 2),
        search_ms=round(outcome.search_ms, 2),
    )


def _chunks(f):
    with f:
        while chunk := f.read(1 << 16):
            yield chunk


def content_disposition(name: str) -> str:
    """`inline` with the file's name, safe for any characters in it (RFC 5987)."""
    return f"inline; filename*=utf-8''{quote(name)}"


def api_router(service: SearchService, thumbnails: ThumbnailCache) -> APIRouter:
    db = service.db
    router = APIRouter(prefix="/api", responses=ERRORS)

    @router.get("/search/text", response_model=SearchResponse, summary="Search by text")
    def search_text(
        q: str = Query(..., description="words, or a combined query such as `dog + beach - snow` or `2:dog`"),
        k: int = K,
        min_similarity: float = MIN_SIMILARITY,
    ):
        return _response(service.by_text(q, k, min_similarity), len(db))

    @router.post("/search/text", response_model=SearchResponse, summary="Search by text (long queries)")
    def search_text_post(body: TextQuery):
        return _response(service.by_text(body.q, body.k, body.min_similarity), len(db))

    @router.post("/search/image", response_model=SearchResponse, summary="Search by an uploaded image")
    async def search_image(
        file: UploadFile = File(..., description="an image file"),
        k: int = K,
        min_similarity: float = MIN_SIMILARITY,
    ):
        data = await file.read(service.max_upload_bytes + 1)
        return _response(await run_in_threadpool(service.by_image, data, k, min_similarity), len(db))

    @router.get("/search/item/{index}", response_model=SearchResponse, summary="Items similar to a stored item")
    def search_item(index: int, k: int = K, min_similarity: float = MIN_SIMILARITY):
        return _response(service.by_item(index, k, min_similarity), len(db))

    @router.get("/stats", summary="Items indexed, latest timings, running scans")
    def stats():
        return service.stats()

    @router.get("/items/{index}", response_model=ItemInfo, summary="One stored item")
    def item(index: int):
        index = service.check_index(index)
        it = db[index]
        return ItemInfo(index=index, path=it.path, size=it.size, mtime=it.mtime, metadata=it.metadata)

    @router.get("/items/{index}/thumbnail", response_class=FileResponse, summary="An item's JPEG thumbnail")
    def thumbnail(index: int):
        return FileResponse(thumbnails.get(index), media_type="image/jpeg",
                            headers={"Cache-Control": "private, max-age=86400"})

    @router.get("/items/{index}/original", response_class=StreamingResponse, summary="An item's original file")
    def original(index: int):
        f = open_original(db, index)  # checked against its content hash, then sent from this descriptor
        name = Path(db[index].path).name
        return StreamingResponse(_chunks(f),
                                 media_type=mimetypes.guess_type(name)[0] or "application/octet-stream",
                                 headers={"Content-Disposition": content_disposition(name),
                                          "Content-Length": str(db[index].size)})

    return router


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

    @app.exception_handler(NotServable)
    async def not_servable(request: Request, exc: NotServable):
        return JSONResponse({"error": str(exc)}, status_code=404)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):  # e.g. a body that is not JSON
        return JSONResponse({"error": " ".join(str(exc.detail).split())}, status_code=exc.status_code,
                            headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "request"
        value = first.get("input")
        shown = "" if value is None or isinstance(value, dict) else f" (got {str(value)[:40]!r})"
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid')}{shown}"}, status_code=422)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("error serving %s", request.url.path)
        return JSONResponse({"error": f"internal error ({type(exc).__name__}); the server keeps serving"},
                            status_code=500)
