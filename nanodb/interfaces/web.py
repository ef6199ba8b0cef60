"""The web UI (Gradio Blocks): search by text as you type or by a dropped image, filter, browse in a lightbox.

The gallery shows thumbnails served by the HTTP API (/api/items/N/thumbnail), so the browser loads
small cached JPEGs in parallel and the search itself returns at once. Clicking a tile opens the
lightbox: the original large, its details, previous/next, "similar to this" and "open original".
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass
from datetime import datetime

import gradio as gr

from nanodb.database import Item, SearchResults
from nanodb.interfaces.search_service import BadRequest, SearchService
from nanodb.media.opener import ImageRejected, read_image_file
from nanodb.search.request import Filters

DEFAULT_K = 64
HINT = ("Type what you are looking for (`a red car`, `dog + beach - snow`), or drop a photo to find similar ones. "
        "Click a result to see it large.")

# Responsive: tiles at least 110 px wide (two or three columns on a phone), inputs stack on narrow
# screens, file names appear on hover; the lightbox covers the window.
CSS = """
#results, #results .grid-wrap { max-height: none !important; min-height: 0 !important; }
#results .grid-container { grid-template-columns: repeat(auto-fill, minmax(140px, 1fr)) !important; }
@media (max-width: 640px) {
  #results .grid-container { grid-template-columns: repeat(auto-fill, minmax(110px, 1fr)) !important; }
}
#results .caption-label { opacity: 0; transition: opacity .15s; }
#results .thumbnail-item:hover .caption-label, #results .thumbnail-item:focus .caption-label { opacity: 1; }
#lightbox { position: fixed !important; inset: 0; z-index: 1000; background: rgba(0, 0, 0, .92);
            overflow-y: auto; padding: 12px; margin: 0 !important; }
#lightbox-view img { max-width: 100%; max-height: calc(100vh - 190px); object-fit: contain; display: block;
                     margin: 0 auto; }
#lightbox-view .details { color: #ddd; text-align: center; margin-top: 8px; overflow-wrap: anywhere; }
#lightbox-view .details a { white-space: nowrap; }
#lightbox-view a { color: #8ab4f8; }
#lightbox-buttons { justify-content: center; }
#lightbox-buttons button { flex: 0 1 auto; min-width: 90px; }
"""

# Run on page load: arrow keys move through the lightbox, Escape closes it.
JS = """() => document.addEventListener("keydown", (e) => {
  const box = document.getElementById("lightbox");
  if (!box || !box.checkVisibility() || e.target.matches("input, textarea")) return;  // fixed: no offsetParent
  const id = {ArrowLeft: "lightbox-prev", ArrowRight: "lightbox-next", Escape: "lightbox-close"}[e.key];
  if (id) { document.getElementById(id)?.click(); e.preventDefault(); }
})"""

# Runs in the browser before each keystroke's search: waits 250 ms, then sends the text only if no
# later keystroke came meanwhile (else None, which the server answers at once with no change).
DEBOUNCE = """(text, ...rest) => new Promise(resolve => {
    const typed = (window.nanodbTyped = (window.nanodbTyped || 0) + 1);
    setTimeout(() => resolve([typed === window.nanodbTyped ? text : null, ...rest]), 250);
})"""
# Runs in the browser before any other search (Enter, an image, a click, a slider): a keystroke's
# search still waiting out its debounce is dropped, so it cannot replace these results a moment later.
SUPERSEDE_TYPING = """(...inputs) => { window.nanodbTyped = (window.nanodbTyped || 0) + 1; return inputs; }"""

TEXT_LABEL = "Search by text"


def stats_text(stats: dict) -> str:
    """The stats line: the collection first, timings once there are some, then any scan in progress."""
    line = f"**{stats['items']:,}** photos indexed · {stats['model']}"
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
        stats = gr.Markdown(stats_text(service.stats()), elem_id="stats")
        page = Page(
            query=query, image=image, options=options,
            status=gr.Markdown(HINT, elem_id="status"),
            gallery=gr.Gallery(
                label="Results", columns=8, height="auto", object_fit="cover", allow_preview=False,
                elem_id="results", interactive=False, buttons=[], show_label=False,
            ),
            lightbox=lightbox_layout(),
            shown=gr.State([]),  # (item index, similarity, copies) of each gallery tile
            position=gr.State(0),  # the tile shown in the lightbox
            last=gr.State(None),  # the last search as (kind, query, what), rerun when an option changes
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
    shown: gr.State
    position: gr.State
    last: gr.State

    @property
    def search_outputs(self) -> list:
        """What a search updates, in the order of SearchEvents.run's values."""
        return [self.gallery, self.shown, self.status, self.last, self.query]


def wire_search(page: Page, events: SearchEvents) -> None:
    """Search on typing, Enter, a dropped image, and again with the last query when an option changes."""
    outputs, by_name = page.search_outputs, {"inputs_kwargs": page.options, "show_progress": "hidden"}
    rerun = {"js": SUPERSEDE_TYPING, **by_name}
    # as the user types: debounced in the browser, and `always_last` keeps one search in flight per browser
    page.query.input(events.on_text, [page.query], outputs, js=DEBOUNCE, trigger_mode="always_last", **by_name)
    page.query.submit(events.on_text, [page.query], outputs, **rerun)
    page.image.change(events.on_image, [page.image], outputs, js=SUPERSEDE_TYPING, inputs_kwargs=page.options,
                      show_progress="minimal")
    options = page.options
    for option in (options["k"], options["min_similarity"]):
        option.release(events.on_options, [page.last], outputs, **rerun)
    for f in Filters.described():
        if not f.choices:  # a typed filter: searched when done typing
            options[f.name].submit(events.on_options, [page.last], outputs, **rerun)
            options[f.name].blur(events.on_options, [page.last], outputs, **rerun)
    for option in [options[f.name] for f in Filters.described() if f.choices] + [options["collapse"]]:
        option.input(events.on_options, [page.last], outputs, **rerun)


def wire_lightbox(page: Page, events: SearchEvents) -> None:
    """A click on a tile opens the lightbox; previous, next, close and "similar to this" act in it."""
    box, quiet = page.lightbox, {"show_progress": "hidden"}
    page.gallery.select(events.on_select, [page.shown], [box.column, box.view, page.position], **quiet)
    box.prev_button.click(events.step(-1), [page.shown, page.position], [box.view, page.position], **quiet)
    box.next_button.click(events.step(1), [page.shown, page.position], [box.view, page.position], **quiet)
    box.close_button.click(lambda: gr.Column(visible=False), None, box.column, **quiet)
    box.similar_button.click(events.on_similar, [page.shown, page.position], [*page.search_outputs, box.column],
                             js=SUPERSEDE_TYPING, inputs_kwargs=page.options, **quiet)


def base_url(request: gr.Request | None) -> str:
    return str(request.request.base_url).rstrip("/") if request and request.request else ""


def caption(r) -> str:
    name = os.path.basename(r.path) if r.path else f"item {r.index}"
    copies = f" ×{len(r.duplicates) + 1}" if r.duplicates else ""
    return f"{name}{copies} · {r.similarity:.3f}"


class SearchEvents:
    """The page's event handlers. The search events take their own inputs, then the options by name
    (see `option_inputs`); their names are the web UI's API names (/gradio_api/info)."""

    UNCHANGED = [gr.skip()] * 5

    def __init__(self, service: SearchService):
        self.service = service
        self.db = service.db

    def run(self, kind: str, query, what: str, request: gr.Request, options: dict) -> list:
        """Search; returns the new values of Page.search_outputs."""
        try:
            outcome = self.search(kind, query, options)
        except (BadRequest, OSError) as e:
            return [gr.skip(), gr.skip(), f"⚠️ {e}", gr.skip(), gr.skip()]
        base = base_url(request)
        tiles = [(f"{base}/api/items/{r.index}/thumbnail", caption(r)) for r in outcome]
        filtered = " (filtered)" if search_filters(options)["filters"] else ""
        note = (f"**{len(tiles)} results for {what}**{filtered} · encode {outcome.encode_ms:.1f} ms · "
                f"search {outcome.search_ms:.1f} ms")
        if not tiles:
            note += " · nothing matches: loosen the filters or the minimum similarity"
        label = TEXT_LABEL if kind == "text" else f"{TEXT_LABEL} · showing {what}"
        return [gr.Gallery(value=tiles, selected_index=None), [(r.index, r.similarity, len(r.duplicates) + 1)
                for r in outcome], note, (kind, query, what), gr.Textbox(label=label)]

    def search(self, kind: str, query, options: dict) -> SearchResults:
        k, min_similarity, filters = options["k"], options["min_similarity"], search_filters(options)
        if kind == "text":
            return self.service.by_text(query, k, min_similarity, **filters)
        if kind == "image":
            try:  # the upload Gradio stored, read through the one opener (a regular file, bounded)
                data = read_image_file(query, self.service.max_upload_bytes).data
            except ImageRejected as e:
                raise BadRequest(f"cannot search by this upload: {e}") from None
            return self.service.by_image(data, k, min_similarity, **filters)
        return self.service.by_item(query, k, min_similarity, **filters)

    def on_text(self, text, request: gr.Request, **options):
        if text is None:  # superseded by a later keystroke (see DEBOUNCE)
            return self.UNCHANGED
        if not text.strip():
            return [gr.Gallery(value=[], selected_index=None), [], HINT, None, gr.Textbox(label=TEXT_LABEL)]
        return self.run("text", text, f"“{html.escape(text.strip()[:80])}”", request, options)

    def on_image(self, path, request: gr.Request, **options):
        return self.run("image", path, "the uploaded image", request, options) if path else self.UNCHANGED

    def on_options(self, searched, request: gr.Request, **options):
        return self.run(*searched, request, options) if searched else self.UNCHANGED

    def on_similar(self, tiles, at, request: gr.Request, **options):
        if not 0 <= at < len(tiles):
            return [*self.UNCHANGED, gr.skip()]
        index = tiles[at][0]
        name = os.path.basename(self.db.path_of(index) or "") or f"item {index}"
        return [*self.run("item", index, f"similar to {html.escape(name)}", request, options),
                gr.Column(visible=False)]

    def on_select(self, tiles, evt: gr.SelectData, request: gr.Request):
        if evt.index is None or not 0 <= evt.index < len(tiles):
            return gr.skip(), gr.skip(), gr.skip()
        return gr.Column(visible=True), self.lightbox_html(tiles, evt.index, request), evt.index

    def step(self, by: int):
        def move(tiles, at, request: gr.Request):
            if not tiles:
                return gr.skip(), gr.skip()
            at = (at + by) % len(tiles)
            return self.lightbox_html(tiles, at, request), at
        return move

    def lightbox_html(self, tiles, at, request: gr.Request | None) -> str:
        index, similarity, copies = tiles[at]
        base = base_url(request)
        item = self.db[index] if self.db.has_item(index) else None
        path = item.path if item else None
        name = html.escape(os.path.basename(path)) if path else f"item {index}"
        folder_name = html.escape(os.path.dirname(path)) if path else "-"
        when, source = taken_date(item)
        original = f"{base}/api/items/{index}/original"
        thumb = f"{base}/api/items/{index}/thumbnail"
        copies_text = f" · {copies} identical files" if copies > 1 else ""
        return (
            f'<img src="{original}" alt="{name}" onerror="this.onerror=null;this.src=\'{thumb}\'">'
            f'<div class="details"><b>{name}</b> · {at + 1} of {len(tiles)}<br>'
            f'{folder_name}<br>{when} ({source}) · {human_size(item.size if item else -1)} · '
            f'similarity {similarity:.3f}{copies_text} · '
            f'<a href="{original}" target="_blank" rel="noopener" id="lightbox-original">open original</a>'
            f"</div>"
        )
