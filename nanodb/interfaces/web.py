"""The web UI (Gradio Blocks): search by text as you type or by a dropped image, filter, browse in a lightbox.

The gallery shows thumbnails served by the HTTP API (/api/items/N/thumbnail), so the browser loads
small cached JPEGs in parallel and the search itself returns at once (a video's tile: its best frame,
the moment in the caption, `name @ 00:01:23`). Clicking a tile opens the lightbox: the original large
(a video plays from that frame's moment), its details, previous/next, "similar to this" and "open original".
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass
from datetime import datetime

import gradio as gr

from nanodb.database import Item, SearchResults
from nanodb.interfaces import web_assets as assets
from nanodb.interfaces.search_service import BadRequest, SearchService
from nanodb.interfaces.thumbnails import item_links
from nanodb.media.opener import ImageRejected, read_image_file
from nanodb.media.video import frame_time, is_video_frame, timestamp
from nanodb.search.request import Filters

CSS, JS = assets.CSS, assets.JS  # the server mounts the page with them

DEFAULT_K = 64
NO_FILE = "no file to show"  # for an item without one this server sends (a vector, a URL's)
HINT = ("Type what you are looking for (`a red car`, `dog + beach - snow`), or drop a photo to find similar ones. "
        "Click a result to see it large.")

TEXT_LABEL = "Search by text"


def stats_text(stats: dict) -> str:
    """The stats line: the collection first, timings once there are some, then any scan in progress."""
    # an item is a photo or one frame of a video (docs/videos.md)
    line = f"**{stats['items']:,}** items indexed · {stats['model']}"
    timings = [(name, stats[key]) for name, key in
               (("text", "text_encode_ms"), ("image", "image_encode_ms"), ("search", "search_ms"))
               if stats[key] is not None]
    if timings:
        line += " · " + ", ".join(f"{name} {ms:.1f} ms" for name, ms in timings)
    for scan in stats["scans"]:
        total = f"{scan['found']:,}{'+' if scan['walking'] else ''}"
        line += f" · scanning {scan['done']:,}/{total} ({scan['added']:,} added, {scan['failed']:,} skipped)"
    return line


def taken_date(item: Item | None) -> tuple[str, str]:
    """(date, where it came from): the EXIF date taken the scan kept, else the file's modification time
    when it was indexed. From the item's record: the server opens no file to show a date."""
    if item is None:
        return "unknown", "date"
    if taken := item.metadata.get("taken"):
        try:
            return datetime.fromisoformat(str(taken)).strftime("%Y-%m-%d %H:%M"), "taken"
        except ValueError:
            pass
    if item.size >= 0:  # an item added from memory has no file time
        return datetime.fromtimestamp(item.mtime).strftime("%Y-%m-%d %H:%M"), "file time"
    return "unknown", "date"


def human_size(size: int) -> str:
    if size < 0:
        return "-"
    for unit in ("bytes", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:,.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return ""


def build_ui(service: SearchService) -> gr.Blocks:
    """The page: search inputs, filters and options, the stats, the results and the lightbox."""
    with gr.Blocks(title="nanodb", analytics_enabled=False) as ui:
        gr.Markdown("## nanodb")
        query, image = search_inputs(service)
        options = option_inputs()
        duplicates_view(service)
        stats = gr.Markdown(stats_text(service.stats()), elem_id="stats")
        page = Page(
            query=query, image=image, options=options,
            status=gr.Markdown(HINT, elem_id="status"),
            gallery=gr.Gallery(
                label="Results", columns=8, height="auto", object_fit="cover", allow_preview=False,
                elem_id="results", interactive=False, buttons=[], show_label=False,
            ),
            lightbox=lightbox_layout(),
            # held by the browser; `shown` and `last` are set with the tiles when a search's results are shown
            shown=gr.JSON([], visible=False),  # [item index, similarity, copies] of each tile
            position=gr.Number(0, precision=0, visible=False),  # the tile the lightbox shows
            viewing=gr.Number(None, precision=0, visible=False),  # its item, which "similar to this" searches by
            last=gr.JSON(None, visible=False),  # the request whose results are shown, rerun when an option changes
            request=gr.JSON(None, visible=False),  # the latest search the browser asked for, numbered
            answer=gr.JSON(None, visible=False),  # a search's answer, shown only if still the latest
            answer_tiles=gr.Gallery(visible=False),
        )
        events = SearchEvents(service)
        wire_search(page, events)
        wire_lightbox(page, events)
        gr.Timer(1.0).tick(lambda: stats_text(service.stats()), None, stats, show_progress="hidden")
    return ui


def search_inputs(service: SearchService) -> tuple[gr.Textbox, gr.Image]:
    with gr.Row(equal_height=True, elem_id="inputs"):
        query = gr.Textbox(
            label=TEXT_LABEL, placeholder="a girl riding a horse", scale=3, min_width=260, elem_id="query",
            max_length=service.max_query_chars,
        )
        image = gr.Image(
            label="Search by image (drop, upload or paste)", type="filepath", image_mode=None,
            sources=["upload", "clipboard"], height=140, scale=1, min_width=260, elem_id="image-query",
        )
    return query, image


def option_inputs() -> dict[str, gr.components.Component]:
    """The filters and options, by the name every search event takes them as (in this order)."""
    with gr.Accordion("Filters and options", open=False, elem_id="filters"):
        with gr.Row():  # the filters, as search.request.Filters declares them: typed in, or picked
            filters = {f.name: gr.Textbox(label=f.label, placeholder=f.placeholder, elem_id=f.name, min_width=150)
                       for f in Filters.described() if not f.choices}
        filters |= {f.name: gr.CheckboxGroup(list(f.choices), label=f.label, elem_id=f.name)
                    for f in Filters.described() if f.choices}
        with gr.Row():
            collapse = gr.Checkbox(True, label="One tile for identical files", elem_id="collapse")
            k = gr.Slider(1, 256, value=DEFAULT_K, step=1, label="Results", elem_id="k", min_width=180)
            min_similarity = gr.Slider(-1, 1, value=-1, step=0.01, label="Minimum similarity",
                                       elem_id="min-similarity", min_width=180)
    return {"k": k, "min_similarity": min_similarity, **filters, "collapse": collapse}


def duplicates_view(service: SearchService) -> None:
    """The Duplicates view: groups of near-duplicates at the slider's threshold, shown when it opens, when
    the threshold is released and on "Find"; computed by the server one at a time, the last result kept."""
    with gr.Accordion("Duplicates", open=False, elem_id="duplicates"):
        with gr.Row(equal_height=True):
            threshold = gr.Slider(0.8, 1.0, value=0.95, step=0.01, label="Similarity threshold",
                                  elem_id="dup-threshold", min_width=180, scale=3)
            find = gr.Button("Find duplicates", elem_id="dup-find", variant="primary", scale=1, min_width=120)
        status = gr.Markdown("Near-duplicates: resized or re-encoded copies, bursts, light edits.",
                             elem_id="dup-status")
        groups = gr.HTML(elem_id="dup-groups")
    show = DuplicatesEvents(service).show
    gr.on([find.click, threshold.release], show, threshold, [status, groups], show_progress="minimal",
          trigger_mode="always_last", concurrency_limit=1)


class DuplicatesEvents:
    def __init__(self, service: SearchService):
        self.service = service

    def show(self, threshold, request: gr.Request) -> tuple[str, str]:
        """(the status line, the groups' HTML): each group a row of tiles, largest groups first."""
        try:
            found = self.service.duplicates.find(threshold)
        except (BadRequest, NotImplementedError) as e:  # NotImplementedError: a sharded database's
            return f"⚠️ {e}", gr.skip()
        answer = found.answer(self.service.db)
        took = "cached" if found.cached else f"took {found.seconds:.2f} s"
        n = answer["total_groups"]
        status = (f"**{n:,} group{'s' if n != 1 else ''}** of near-duplicates at similarity ≥ "
                  f"{found.threshold:.2f} · {answer['total_items']:,} items · {took}")
        if answer["truncated"]:
            status += f" · showing the largest {len(answer['groups'])}"
        return status, duplicates_html(answer, base_url(request))


def duplicates_html(answer: dict, base: str) -> str:
    """Each group a row of its tiles (a thumbnail linking to the original, its name and similarity)."""
    rows = []
    for number, group in enumerate(answer["groups"], 1):
        tiles = []
        for m in group["items"]:
            name = os.path.basename(m["path"]) if m["path"] else f"item {m['index']}"
            if m["time"] is not None:
                name += f" @ {timestamp(m['time'])}"
            name = html.escape(name)
            link = f' href="{base}{m["original"]}" target="_blank" rel="noopener"' if m["original"] else ""
            image = (f'<img src="{base}{m["thumbnail"]}" alt="{name}" loading="lazy">' if m["thumbnail"] else
                     f'<div class="no-file">{NO_FILE}</div>')
            tiles.append(f'<a class="dup-tile"{link} title="{html.escape(m["path"] or name)}" '
                         f'data-index="{m["index"]}">{image}<span>{name}<br>{m["similarity"]:.3f}</span></a>')
        rows.append(f'<div class="dup-group"><div class="dup-head">Group {number} · {group["size"]} items</div>'
                    f'<div class="dup-row">{"".join(tiles)}</div></div>')
    return "".join(rows)


def search_filters(options: dict) -> dict:
    """The options' values as SearchService's filters and collapse (empty fields filter nothing)."""
    return {"filters": Filters(**{f.name: options[f.name] or None for f in Filters.described()}),
            "collapse": bool(options["collapse"])}


@dataclass
class Lightbox:
    column: gr.Column
    view: gr.HTML
    prev_button: gr.Button
    similar_button: gr.Button
    next_button: gr.Button
    close_button: gr.Button


def lightbox_layout() -> Lightbox:
    with gr.Column(visible=False, elem_id="lightbox") as column:
        view = gr.HTML(elem_id="lightbox-view")
        with gr.Row(elem_id="lightbox-buttons"):
            buttons = [gr.Button("← Previous", elem_id="lightbox-prev", size="sm"),
                       gr.Button("Similar to this", elem_id="lightbox-similar", size="sm", variant="primary"),
                       gr.Button("Next →", elem_id="lightbox-next", size="sm"),
                       gr.Button("Close", elem_id="lightbox-close", size="sm")]
    return Lightbox(column, view, *buttons)


@dataclass
class Page:
    """The components that the events read and write."""

    query: gr.Textbox
    image: gr.Image
    options: dict[str, gr.components.Component]
    status: gr.Markdown
    gallery: gr.Gallery
    lightbox: Lightbox
    shown: gr.JSON
    position: gr.Number
    viewing: gr.Number
    last: gr.JSON
    request: gr.JSON
    answer: gr.JSON
    answer_tiles: gr.Gallery


def wire_search(page: Page, events: SearchEvents) -> None:
    """Typing, Enter, a dropped image, "similar to this" and a changed option each write a numbered request
    in the browser (web_assets); the one search event runs the latest, and its results are shown if no
    later search has started meanwhile."""
    ask = {"outputs": page.request, "show_progress": "hidden", "queue": False}
    page.query.input(None, page.query, js=assets.REQUEST_TYPED, **ask)
    page.query.submit(None, page.query, js=assets.REQUEST_TEXT, **ask)
    page.image.change(None, page.image, js=assets.REQUEST_IMAGE, **ask)
    page.lightbox.similar_button.click(None, page.viewing, js=assets.REQUEST_SIMILAR,
                                       **ask | {"outputs": [page.request, page.lightbox.column]})
    options = page.options
    rerun = [options["k"].release, options["min_similarity"].release, options["collapse"].input]
    for f in Filters.described():  # a typed filter is searched when done typing; a picked one at once
        rerun += [options[f.name].input] if f.choices else [options[f.name].submit, options[f.name].blur]
    gr.on(rerun, None, page.last, js=assets.REQUEST_AGAIN, **ask)
    answered = page.request.change(events.search, [page.request, page.image], [page.answer_tiles, page.answer],
                                   inputs_kwargs=options, trigger_mode="always_last", show_progress="hidden")
    answered.success(None, [page.answer, page.answer_tiles], [page.gallery, page.shown, page.status, page.last,
                     page.query], js=assets.SHOW_RESULTS, show_progress="hidden", queue=False)
    # the same searches for scripts (gradio_client, /gradio_api/call/...), by text or by an uploaded image
    scripts = gr.Button(visible=False)
    scripts.click(events.on_text, page.query, [page.answer_tiles, page.answer], inputs_kwargs=options)
    scripts.click(events.on_image, page.image, [page.answer_tiles, page.answer], inputs_kwargs=options)


def wire_lightbox(page: Page, events: SearchEvents) -> None:
    """A click on a tile opens the lightbox; previous, next and close act in it ("similar to this": a search)."""
    box, quiet = page.lightbox, {"show_progress": "hidden"}
    shows = [box.view, page.position, page.viewing]
    page.gallery.select(events.on_select, [page.shown], [box.column, *shows], **quiet)
    box.prev_button.click(events.step(-1), [page.shown, page.position], shows, **quiet)
    box.next_button.click(events.step(1), [page.shown, page.position], shows, **quiet)
    box.close_button.click(lambda: gr.Column(visible=False), None, box.column, **quiet)


def base_url(request: gr.Request | None) -> str:
    return str(request.request.base_url).rstrip("/") if request and request.request else ""


def caption(r) -> str:
    name = os.path.basename(r.path) if r.path else f"item {r.index}"
    at = f" @ {timestamp(r.time)}" if r.time is not None else ""  # a video's frame: its moment
    copies = f" ×{len(r.duplicates) + 1}" if r.duplicates else ""
    return f"{name}{at}{copies} · {r.similarity:.3f}"


def tiles_of(shown) -> list[tuple[int, float, int]]:
    """The browser's [item index, similarity, copies] of each tile, checked (junk: no tiles)."""
    try:
        return [(int(index), float(similarity), int(copies)) for index, similarity, copies in shown or []]
    except (TypeError, ValueError):
        return []


class SearchEvents:
    """The page's event handlers. The search events (`search`, the page's; `on_text` and `on_image`, the
    same for scripts) take their own inputs, then the options by name (see `option_inputs`); their names
    are the web UI's API names (/gradio_api/info)."""

    def __init__(self, service: SearchService):
        self.service = service
        self.db = service.db

    def search(self, asked, image, request: gr.Request, **options) -> list:
        """The page's search: `asked` the request as the browser numbered it (web_assets), `image` the
        dropped image. Returns [the tiles, the answer] for SHOW_RESULTS."""
        try:
            seq, kind = int(asked["seq"]), asked["kind"]
            query = {"text": asked.get("text"), "image": image, "item": asked.get("index")}[kind]
        except (TypeError, KeyError, ValueError):
            return [gr.skip(), {"seq": None, "failed": True, "status": "⚠️ not a search request"}]
        return self.answer(seq, kind, query, request, options)

    def on_text(self, text, request: gr.Request, **options):
        return self.answer(0, "text", text, request, options)

    def on_image(self, path, request: gr.Request, **options):
        return self.answer(0, "image", path, request, options)

    def answer(self, seq: int, kind: str, query, request: gr.Request | None, options: dict) -> list:
        """Search; returns [the tiles, {seq, shown, status, last, label}] (on an error, {seq, failed, status})."""
        if kind == "text" and not (query if isinstance(query, str) else "").strip():
            return [[], {"seq": seq, "shown": [], "status": HINT, "last": None, "label": TEXT_LABEL}]
        try:
            what, outcome = self.search_by(kind, query, options)
        except (BadRequest, OSError) as e:
            return [gr.skip(), {"seq": seq, "failed": True, "status": f"⚠️ {e}"}]
        base = base_url(request)
        tiles = [(f"{base}/api/items/{r.index}/thumbnail", caption(r)) for r in outcome]
        filtered = " (filtered)" if search_filters(options)["filters"] else ""
        note = (f"**{len(tiles)} results for {what}**{filtered} · encode {outcome.encode_ms:.1f} ms · "
                f"search {outcome.search_ms:.1f} ms")
        if not tiles:
            note += " · nothing matches: loosen the filters or the minimum similarity"
        last = {"kind": kind} | ({"text": query} if kind == "text" else {"index": query} if kind == "item" else {})
        return [tiles, {"seq": seq, "shown": [[r.index, r.similarity, len(r.duplicates) + 1] for r in outcome],
                        "status": note, "last": last,
                        "label": TEXT_LABEL if kind == "text" else f"{TEXT_LABEL} · showing {what}"}]

    def search_by(self, kind: str, query, options: dict) -> tuple[str, SearchResults]:
        """(what the results are for, the results)."""
        k, min_similarity, filters = options["k"], options["min_similarity"], search_filters(options)
        if kind == "text":
            return f"“{html.escape(query.strip()[:80])}”", self.service.by_text(query, k, min_similarity, **filters)
        if kind == "image":
            if not query:
                raise BadRequest("drop an image to search by it")
            try:  # the upload Gradio stored, read through the one opener (a regular file, bounded)
                data = read_image_file(query, self.service.max_upload_bytes).data
            except ImageRejected as e:
                raise BadRequest(f"cannot search by this upload: {e}") from None
            return "the uploaded image", self.service.by_image(data, k, min_similarity, **filters)
        index = self.service.check_index(query)
        name = os.path.basename(self.db.path_of(index) or "") or f"item {index}"
        return f"similar to {html.escape(name)}", self.service.by_item(index, k, min_similarity, **filters)

    def on_select(self, shown, evt: gr.SelectData, request: gr.Request):
        tiles = tiles_of(shown)
        if evt.index is None or not 0 <= evt.index < len(tiles):
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return gr.Column(visible=True), self.lightbox_html(tiles, evt.index, request), evt.index, tiles[evt.index][0]

    def step(self, by: int):
        def move(shown, at, request: gr.Request):
            tiles = tiles_of(shown)
            if not tiles:
                return gr.skip(), gr.skip(), gr.skip()
            at = (int(at or 0) + by) % len(tiles)
            return self.lightbox_html(tiles, at, request), at, tiles[at][0]
        return move

    def lightbox_html(self, tiles, at, request: gr.Request | None) -> str:
        index, similarity, copies = tiles[at]
        base = base_url(request)
        item = self.db[index] if self.db.has_item(index) else None
        path = item.path if item else None
        name = html.escape(os.path.basename(path)) if path else f"item {index}"
        folder_name = html.escape(os.path.dirname(path)) if path else "-"
        when, source = taken_date(item)
        links = item_links(index, path)
        original, thumb = f"{base}{links['original']}", f"{base}{links['thumbnail']}"
        copies_text = f" · {copies} identical files" if copies > 1 else ""
        moment = frame_time(item.metadata) if item is not None and is_video_frame(path, item.metadata) else None
        if links["original"] is None:
            view = f'<div class="no-file">{NO_FILE}</div>'
        elif moment is not None:  # played from the frame's moment (a media fragment), muted so that it may start
            view = (f'<video src="{original}#t={moment:.3f}" poster="{thumb}" controls autoplay muted playsinline '
                    f'preload="auto" data-time="{moment:.3f}" title="{name}"></video>')
        else:
            view = f'<img src="{original}" alt="{name}" onerror="this.onerror=null;this.src=\'{thumb}\'">'
        if moment is not None:
            name += f" @ {timestamp(moment)}"
        opener = (f' · <a href="{original}" target="_blank" rel="noopener" id="lightbox-original">open original</a>'
                  if links["original"] else "")
        return (
            view +
            f'<div class="details"><b class="name">{name}</b> · {at + 1} of {len(tiles)}<br>'
            f'{folder_name}<br>{when} ({source}) · {human_size(item.size if item else -1)} · '
            f'similarity {similarity:.3f}{copies_text}{opener}</div>'
        )
