"""The web UI (Gradio Blocks): search by text as you type or by a dropped image, filter, browse in a lightbox.

The gallery shows thumbnails served by the HTTP API (/api/items/N/thumbnail), so the browser loads
small cached JPEGs in parallel and the search itself returns at once. Clicking a tile opens the
lightbox: the original large, its details, previous/next, "similar to this" and "open original".
"""

from __future__ import annotations

import html
import os
from datetime import datetime

import gradio as gr

from nanodb.interfaces.search_service import BadRequest, SearchService

DEFAULT_K = 64
TYPES = ["jpg", "png", "webp", "gif", "heic", "tiff", "bmp"]
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


def taken_date(path: str) -> tuple[str, str]:
    """(date, where it came from): the EXIF date taken where the file has one, else its modification time."""
    try:
        from PIL import Image

        with Image.open(path) as im:  # reads the header only
            exif = im.getexif()
            value = exif.get_ifd(0x8769).get(36867) or exif.get(306)
        if value:
            return datetime.strptime(str(value).strip()[:19], "%Y:%m:%d %H:%M:%S").strftime("%Y-%m-%d %H:%M"), "taken"
    except (OSError, ValueError, SyntaxError):
        pass
    try:
        return datetime.fromtimestamp(os.stat(path).st_mtime).strftime("%Y-%m-%d %H:%M"), "file time"
    except OSError:
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
    db = service.db
    with gr.Blocks(title="nanodb", analytics_enabled=False) as ui:
        gr.Markdown("## nanodb")
        with gr.Row(equal_height=True, elem_id="inputs"):
            query = gr.Textbox(
                label=TEXT_LABEL, placeholder="a girl riding a horse", scale=3, min_width=260, elem_id="query",
                max_length=service.max_query_chars,
            )
            image = gr.Image(
                label="Search by image (drop, upload or paste)", type="filepath", image_mode=None,
                sources=["upload", "clipboard"], height=140, scale=1, min_width=260, elem_id="image-query",
            )
        with gr.Accordion("Filters and options", open=False, elem_id="filters"):
            with gr.Row():
                folder = gr.Textbox(label="Folder", placeholder="/photos/2024 or holidays", elem_id="folder",
                                    min_width=180)
                since = gr.Textbox(label="From date", placeholder="YYYY-MM-DD", elem_id="since", min_width=120)
                until = gr.Textbox(label="To date", placeholder="YYYY-MM-DD", elem_id="until", min_width=120)
            types = gr.CheckboxGroup(TYPES, label="File types (none: all)", elem_id="types")
            with gr.Row():
                collapse = gr.Checkbox(True, label="One tile for identical files", elem_id="collapse")
                k = gr.Slider(1, 256, value=DEFAULT_K, step=1, label="Results", elem_id="k", min_width=180)
                min_similarity = gr.Slider(-1, 1, value=-1, step=0.01, label="Minimum similarity",
                                           elem_id="min-similarity", min_width=180)
        stats = gr.Markdown(stats_text(service.stats()), elem_id="stats")
        status = gr.Markdown(HINT, elem_id="status")
        gallery = gr.Gallery(
            label="Results", columns=8, height="auto", object_fit="cover", allow_preview=False,
            elem_id="results", interactive=False, buttons=[], show_label=False,
        )
        with gr.Column(visible=False, elem_id="lightbox") as lightbox:
            view = gr.HTML(elem_id="lightbox-view")
            with gr.Row(elem_id="lightbox-buttons"):
                prev_button = gr.Button("← Previous", elem_id="lightbox-prev", size="sm")
                similar_button = gr.Button("Similar to this", elem_id="lightbox-similar", size="sm",
                                           variant="primary")
                next_button = gr.Button("Next →", elem_id="lightbox-next", size="sm")
                close_button = gr.Button("Close", elem_id="lightbox-close", size="sm")
        shown = gr.State([])  # (item index, similarity, copies) of each gallery tile
        position = gr.State(0)  # the tile shown in the lightbox
        last = gr.State(None)  # the last search as (kind, query, what), rerun when an option changes

        def base_url(request: gr.Request | None) -> str:
            return str(request.request.base_url).rstrip("/") if request and request.request else ""

        def run(kind: str, query, what: str, options: list, request: gr.Request) -> list:
            """Search; returns the new values of [gallery, shown, status, last, query]."""
            k, min_similarity, folder, since, until, types, collapse = options
            filters = {"folder": folder or None, "since": since or None, "until": until or None,
                       "types": types or None, "collapse_duplicates": bool(collapse)}
            try:
                if kind == "text":
                    outcome = service.by_text(query, k, min_similarity, **filters)
                elif kind == "image":
                    with open(query, "rb") as f:
                        data = f.read(service.max_upload_bytes + 1)
                    outcome = service.by_image(data, k, min_similarity, **filters)
                else:
                    outcome = service.by_item(query, k, min_similarity, **filters)
            except (BadRequest, OSError) as e:
                return [gr.skip(), gr.skip(), f"⚠️ {e}", gr.skip(), gr.skip()]
            base = base_url(request)
            tiles = [(f"{base}/api/items/{r.index}/thumbnail", caption(r)) for r in outcome]
            filtered = " (filtered)" if any(v for v in (folder, since, until, types)) else ""
            note = (f"**{len(tiles)} results for {what}**{filtered} · encode {outcome.encode_ms:.1f} ms · "
                    f"search {outcome.search_ms:.1f} ms")
            if not tiles:
                note += " · nothing matches: loosen the filters or the minimum similarity"
            label = TEXT_LABEL if kind == "text" else f"{TEXT_LABEL} · showing {what}"
            return [gr.Gallery(value=tiles, selected_index=None), [(r.index, r.similarity, len(r.duplicates) + 1)
                    for r in outcome], note, (kind, query, what), gr.Textbox(label=label)]

        def caption(r) -> str:
            name = os.path.basename(r.path) if r.path else f"item {r.index}"
            copies = f" ×{len(r.duplicates) + 1}" if r.duplicates else ""
            return f"{name}{copies} · {r.similarity:.3f}"

        unchanged = [gr.skip()] * 5
        outputs = [gallery, shown, status, last, query]
        options = [k, min_similarity, folder, since, until, types, collapse]

        def on_text(text, k, min_similarity, folder, since, until, types, collapse, request: gr.Request):
            values = [k, min_similarity, folder, since, until, types, collapse]
            if text is None:  # superseded by a later keystroke (see DEBOUNCE)
                return unchanged
            if not text.strip():
                return [gr.Gallery(value=[], selected_index=None), [], HINT, None, gr.Textbox(label=TEXT_LABEL)]
            return run("text", text, f"“{html.escape(text.strip()[:80])}”", values, request)

        def on_image(path, k, min_similarity, folder, since, until, types, collapse, request: gr.Request):
            values = [k, min_similarity, folder, since, until, types, collapse]
            return run("image", path, "the uploaded image", values, request) if path else unchanged

        def on_options(searched, k, min_similarity, folder, since, until, types, collapse, request: gr.Request):
            values = [k, min_similarity, folder, since, until, types, collapse]
            return run(*searched, values, request) if searched else unchanged

        def on_similar(tiles, at, k, min_similarity, folder, since, until, types, collapse, request: gr.Request):
            values = [k, min_similarity, folder, since, until, types, collapse]
            if not 0 <= at < len(tiles):
                return [*unchanged, gr.skip()]
            index = tiles[at][0]
            name = os.path.basename(db.path_of(index) or "") or f"item {index}"
            return [*run("item", index, f"similar to {html.escape(name)}", values, request),
                    gr.Column(visible=False)]

        def lightbox_html(tiles, at, request: gr.Request | None) -> str:
            index, similarity, copies = tiles[at]
            base = base_url(request)
            item = db[index] if db.has_item(index) else None
            path = item.path if item else None
            name = html.escape(os.path.basename(path)) if path else f"item {index}"
            folder_name = html.escape(os.path.dirname(path)) if path else "-"
            when, source = taken_date(path) if path else ("unknown", "date")
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

        def on_select(tiles, evt: gr.SelectData, request: gr.Request):
            if evt.index is None or not 0 <= evt.index < len(tiles):
                return gr.skip(), gr.skip(), gr.skip()
            return gr.Column(visible=True), lightbox_html(tiles, evt.index, request), evt.index

        def step(by: int):
            def move(tiles, at, request: gr.Request):
                if not tiles:
                    return gr.skip(), gr.skip()
                at = (at + by) % len(tiles)
                return lightbox_html(tiles, at, request), at
            return move

        # as the user types: debounced in the browser, and `always_last` keeps one search in flight per browser
        query.input(on_text, [query, *options], outputs, js=DEBOUNCE, trigger_mode="always_last",
                    show_progress="hidden")
        query.submit(on_text, [query, *options], outputs, js=SUPERSEDE_TYPING, show_progress="hidden")
        image.change(on_image, [image, *options], outputs, js=SUPERSEDE_TYPING, show_progress="minimal")
        for option in (k, min_similarity):
            option.release(on_options, [last, *options], outputs, js=SUPERSEDE_TYPING, show_progress="hidden")
        for option in (folder, since, until):
            option.submit(on_options, [last, *options], outputs, js=SUPERSEDE_TYPING, show_progress="hidden")
            option.blur(on_options, [last, *options], outputs, js=SUPERSEDE_TYPING, show_progress="hidden")
        for option in (types, collapse):
            option.input(on_options, [last, *options], outputs, js=SUPERSEDE_TYPING, show_progress="hidden")
        gallery.select(on_select, [shown], [lightbox, view, position], show_progress="hidden")
        prev_button.click(step(-1), [shown, position], [view, position], show_progress="hidden")
        next_button.click(step(1), [shown, position], [view, position], show_progress="hidden")
        close_button.click(lambda: gr.Column(visible=False), None, lightbox, show_progress="hidden")
        similar_button.click(on_similar, [shown, position, *options], [*outputs, lightbox],
                             js=SUPERSEDE_TYPING, show_progress="hidden")
        gr.Timer(1.0).tick(lambda: stats_text(service.stats()), None, stats, show_progress="hidden")
    return ui
