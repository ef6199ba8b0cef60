"""The web UI's CSS and the JavaScript its events run in the browser.

Every search the page starts is numbered in the browser (`window.nanodbSeq`, the latest it started): the
event that starts it writes the number, with what to search, into the hidden `request`, which the one
search event (`SearchEvents.search`) takes; the server answers with the same number, and SHOW_RESULTS
shows the answer only if its number is still the latest. An older search that answers last is dropped,
whichever order Gradio's queue finishes them in. The search event runs `always_last`: while one search
is on its way, the requests that come are not sent, only the latest of them once it has answered.
"""

from __future__ import annotations

# Responsive: tiles at least 110 px wide (two or three columns on a phone), inputs stack on narrow
# screens, file names appear on hover. The lightbox covers the window, opaque, in either theme: the
# photo (or video) as large as the window leaves room for, its name and details light on black below it.
CSS = """
#results, #results .grid-wrap { max-height: none !important; min-height: 0 !important; }
#results .grid-container { grid-template-columns: repeat(auto-fill, minmax(140px, 1fr)) !important; }
@media (max-width: 640px) {
  #results .grid-container { grid-template-columns: repeat(auto-fill, minmax(110px, 1fr)) !important; }
}
#results .caption-label { opacity: 0; transition: opacity .15s; }
#results .thumbnail-item:hover .caption-label, #results .thumbnail-item:focus .caption-label { opacity: 1; }
#lightbox { position: fixed !important; inset: 0; z-index: 1000; margin: 0 !important; padding: 12px;
            background: #000 !important; display: flex; flex-direction: column; flex-wrap: nowrap !important;
            gap: 8px; overflow-y: auto; }
#lightbox-view { flex: 1 1 0; min-height: 0; display: flex; flex-direction: column; padding: 0;
                 background: transparent !important; border: none !important; box-shadow: none !important; }
#lightbox-view .html-container, #lightbox-view .prose { flex: 1 1 0; min-height: 0; display: flex;
                                                       flex-direction: column; padding: 0; max-width: none; }
#lightbox-view img, #lightbox-view video { flex: 1 1 0; min-height: 0; width: 100%; object-fit: contain;
                                           display: block; margin: 0; background: #000; }
#lightbox-view .details { flex: none; color: #e8e8e8 !important; text-align: center; margin-top: 8px;
                          overflow-wrap: anywhere; }
#lightbox-view .details .name { color: #fff !important; }
#lightbox-view .details a { white-space: nowrap; color: #8ab4f8 !important; }
#lightbox-buttons { flex: none; justify-content: center; }
#dup-groups .dup-group { margin: 8px 0; }
#dup-groups .dup-head { font-weight: 600; margin-bottom: 4px; }
#dup-groups .dup-row { display: flex; flex-wrap: wrap; gap: 6px; }
#dup-groups .dup-tile { width: 140px; max-width: calc(50% - 3px); text-decoration: none; color: inherit; }
#dup-groups .dup-tile img { width: 100%; aspect-ratio: 1; object-fit: cover; border-radius: 4px; display: block; }
#dup-groups .no-file, #lightbox-view .no-file { display: flex; align-items: center; justify-content: center;
  text-align: center; aspect-ratio: 1; border-radius: 4px; background: #8883; font-size: 12px; }
#dup-groups .dup-tile span { display: block; font-size: 12px; overflow-wrap: anywhere; line-height: 1.3; }
#lightbox-buttons button { flex: 0 1 auto; min-width: 90px; }
"""

# Run on page load: arrow keys move through the lightbox, Escape closes it.
JS = """() => document.addEventListener("keydown", (e) => {
  const box = document.getElementById("lightbox");
  if (!box || !box.checkVisibility() || e.target.matches("input, textarea")) return;  // fixed: no offsetParent
  const id = {ArrowLeft: "lightbox-prev", ArrowRight: "lightbox-next", Escape: "lightbox-close"}[e.key];
  if (id) { document.getElementById(id)?.click(); e.preventDefault(); }
})"""

# The number of a search the browser starts now: the latest.
_NEXT = "(window.nanodbSeq = (window.nanodbSeq || 0) + 1)"

# The requests, each written into `request` by the event of the user's action ([] writes nothing).
# A keystroke: numbered at once (results still on their way are now out of date), searched once the
# typing has paused for 250 ms, unless another action came meanwhile.
REQUEST_TYPED = f"""(text) => {{
  const seq = {_NEXT};
  const still = () => seq === window.nanodbSeq;
  return new Promise(done => setTimeout(() => done(still() ? [{{seq, kind: "text", text}}] : []), 250));
}}"""
REQUEST_TEXT = f"""(text) => [{{seq: {_NEXT}, kind: "text", text}}]"""
REQUEST_IMAGE = f"""(image) => image ? [{{seq: {_NEXT}, kind: "image"}}] : []"""
# An option changed: the search shown, again (`last` is the request that gave it).
REQUEST_AGAIN = f"""(last) => last ? [{{...last, seq: {_NEXT}}}] : []"""
# "Similar to this": the item the lightbox shows (even if other results came meanwhile); the lightbox closes.
REQUEST_SIMILAR = f"""(item) => item != null ?
  [{{seq: {_NEXT}, kind: "item", index: item}}, {{__type__: "update", visible: false}}] : []"""

# After each search: its answer shown (the tiles, what they are, the request to rerun, the text box's
# label), unless a later search has started since.
SHOW_RESULTS = """(answer, tiles) => {
  if (!answer || answer.seq !== window.nanodbSeq) return [];
  if (answer.failed) return [undefined, undefined, answer.status];
  return [{__type__: "update", value: tiles, selected_index: null}, answer.shown, answer.status, answer.last,
          {__type__: "update", label: answer.label}];
}"""
