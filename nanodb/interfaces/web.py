"""The web UI (Gradio Blocks): search by text as you type or by a dropped image, browse, click for neighbours.

The gallery shows thumbnails served by the HTTP API (/api/items/N/thumbnail), so the browser loads
small cached JPEGs in parallel and the search itself returns at once.
"""

from __future__ import annotations

import gradio as gr

from nanodb.database import SearchResults
from nanodb.interfaces.search_service import BadRequest, SearchService, stats_line

DEFAULT_K = 64
HINT = "Try `dog + beach - snow` or `2:dog + cat`. Click a result to see images similar to it."

# Runs in the browser before each keystroke's search: waits 250 ms, then sends the text only if no
# later keystroke came meanwhile (else None, which the server answers at once with no change).
DEBOUNCE = """(text, k, minSimilarity) => new Promise(resolve => {
    const typed = (window.nanodbTyped = (window.nanodbTyped || 0) + 1);
    setTimeout(() => resolve([typed === window.nanodbTyped ? text : null, k, minSimilarity]), 250);
})"""
# Runs in the browser before any other search (Enter, an image, a click, a slider): a keystroke's
# search still waiting out its debounce is dropped, so it cannot replace these results a moment later.
SUPERSEDE_TYPING = """(...inputs) => { window.nanodbTyped = (window.nanodbTyped || 0) + 1; return inputs; }"""


def build_ui(service: SearchService) -> gr.Blocks:
    with gr.Blocks(title="nanodb", analytics_enabled=False) as ui:
        gr.Markdown(f"## nanodb\n{HINT}")
        with gr.Row(equal_height=True):
            query = gr.Textbox(
                label="Search by text", placeholder="a girl riding a horse", scale=3, elem_id="query",
                max_length=service.max_query_chars,
            )
            image = gr.Image(
                label="Search by image (drop, upload or paste)", type="filepath", image_mode=None,
                sources=["upload", "clipboard"], height=140, scale=1, elem_id="image-query",
            )
        with gr.Row():
            k = gr.Slider(1, 256, value=DEFAULT_K, step=1, label="Results", elem_id="k")
            min_similarity = gr.Slider(-1, 1, value=-1, step=0.01, label="Minimum similarity",
                                       elem_id="min-similarity")
        stats = gr.Markdown(stats_line(service.stats()), elem_id="stats")
        status = gr.Markdown(elem_id="status")
        gallery = gr.Gallery(
            label="Results", columns=8, height=720, object_fit="cover", allow_preview=False,
            elem_id="results", interactive=False, buttons=[],
        )
        selected = gr.Markdown(elem_id="selected")
        shown = gr.State([])  # item index of each gallery tile, for clicks
        last = gr.State(None)  # the last search as (kind, query), rerun when a slider moves

        def show(outcome: SearchResults, what: str, request: gr.Request):
            base = str(request.request.base_url).rstrip("/") if request and request.request else ""
            tiles = [(f"{base}/api/items/{r.index}/thumbnail", f"{r.similarity:.3f}") for r in outcome]
            note = (f"{len(tiles)} results for {what} · encode {outcome.encode_ms:.1f} ms · "
                    f"search {outcome.search_ms:.1f} ms")
            return tiles, [r.index for r in outcome], note

        def run(kind: str, query, k, min_similarity, request: gr.Request) -> list:
            """Search; returns the new values of [gallery, shown, status, selected, last]."""
            try:
                if kind == "text":
                    found = show(service.by_text(query, k, min_similarity), f"“{query.strip()[:80]}”", request)
                elif kind == "image":
                    with open(query, "rb") as f:
                        data = f.read(service.max_upload_bytes + 1)
                    found = show(service.by_image(data, k, min_similarity), "the image", request)
                else:
                    found = show(service.by_item(query, k, min_similarity), f"item {query}", request)
            except (BadRequest, OSError) as e:
                return [gr.skip(), gr.skip(), f"⚠️ {e}", gr.skip(), gr.skip()]
            return [*found, "", (kind, query)]

        unchanged = [gr.skip()] * 5

        def on_text(text, k, min_similarity, request: gr.Request):
            if text is None:  # superseded by a later keystroke (see DEBOUNCE)
                return unchanged
            if not text.strip():
                return [[], [], "", "", None]
            return run("text", text, k, min_similarity, request)

        def on_image(path, k, min_similarity, request: gr.Request):
            return run("image", path, k, min_similarity, request) if path else unchanged

        def on_select(indices, k, min_similarity, evt: gr.SelectData, request: gr.Request):
            if evt.index is None or not 0 <= evt.index < len(indices):
                return unchanged
            index = indices[evt.index]
            values = run("item", index, k, min_similarity, request)
            if isinstance(values[4], tuple):  # the search ran
                caption = evt.value.get("caption") if isinstance(evt.value, dict) else None
                values[3] = (f"**Selected** item {index} · similarity {caption or '?'} · "
                             f"`{service.db.path_of(index)}` · showing its neighbours")
            return values

        def on_slider(searched, k, min_similarity, request: gr.Request):
            if not searched:
                return unchanged
            values = run(*searched, k, min_similarity, request)
            values[3] = gr.skip()  # keep the line about the selected item
            return values

        outputs = [gallery, shown, status, selected, last]
        text_inputs = [query, k, min_similarity]
        # as the user types: debounced in the browser, and `always_last` keeps one search in flight per browser
        query.input(on_text, text_inputs, outputs, js=DEBOUNCE, trigger_mode="always_last", show_progress="hidden")
        query.submit(on_text, text_inputs, outputs, js=SUPERSEDE_TYPING, show_progress="hidden")
        image.change(on_image, [image, k, min_similarity], outputs, js=SUPERSEDE_TYPING, show_progress="minimal")
        gallery.select(on_select, [shown, k, min_similarity], outputs, js=SUPERSEDE_TYPING, show_progress="hidden")
        for slider in (k, min_similarity):
            slider.release(on_slider, [last, k, min_similarity], outputs, js=SUPERSEDE_TYPING,
                           show_progress="hidden")
        gr.Timer(1.0).tick(lambda: stats_line(service.stats()), None, stats, show_progress="hidden")
    return ui
