"""The results on screen belong to the user's last action, however fast the actions follow each other.

Each sequence is scripted in headless Chromium with every core busy (a CPU burner), so searches finish in
an order that varies from try to try. After each try the page is left until every event the browser sent
has been answered and has stood quiet, then the status line and every tile must be the last action's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from helpers.browser import MARKS, click_tile, open_page, set_results, shown_indices, status, wait_for_status

K = 8
pytestmark = MARKS
TRIES = [3, pytest.param(30, marks=pytest.mark.slow)]
WORDS = ["dog", "kitchen", "bus", "cat", "beach", "pizza", "horse", "street", "snow", "bird"]

# Counts, in the page, the web UI events the browser sent (Gradio's queue/join) and the answers it received
# (process_completed on the result stream), the uploads started and still running (a dropped image is
# uploaded before its event is sent), with the time of the latest of any.
EVENT_COUNTER = """(() => {
  const seen = window.nanodbEvents = {sent: [], answered: 0, uploads: 0, uploading: 0, last: performance.now()};
  const plainFetch = window.fetch;
  async function count(reader) {
    const decoder = new TextDecoder();
    let rest = "";
    for (;;) {
      const {done, value} = await reader.read();
      if (done) return;
      const lines = (rest + decoder.decode(value, {stream: true})).split("\\n");
      rest = lines.pop();
      for (const line of lines) {
        if (/"msg":\\s*"process_completed"/.test(line)) { seen.answered += 1; seen.last = performance.now(); }
      }
    }
  }
  window.fetch = async function (input, init) {
    const url = String(input && input.url ? input.url : input);
    if (url.includes("/upload")) {
      seen.uploads += 1; seen.uploading += 1; seen.last = performance.now();
      try { return await plainFetch.apply(this, arguments); }
      finally { seen.uploading -= 1; seen.last = performance.now(); }
    }
    const response = await plainFetch.apply(this, arguments);
    if (url.includes("/queue/join") && response.ok) {
      seen.sent.push(String(init && init.body)); seen.last = performance.now();
    } else if (url.includes("/queue/data") && response.body && !(init && init.method === "POST")) {
      const [mine, theirs] = response.body.tee();
      count(mine.getReader());
      return new Response(theirs, {status: response.status, statusText: response.statusText,
                                   headers: response.headers});
    }
    return response;
  };
})()"""


@pytest.fixture(scope="module")
def cpu_burner():
    """A busy loop on every core while the sequences run."""
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]
    yield
    for burner in burners:
        burner.kill()
        burner.wait()


@pytest.fixture
def site(photo_site):
    return photo_site


@pytest.fixture
def page(chromium_browser, site, cpu_burner):
    page = open_page(chromium_browser, site[1], init_script=EVENT_COUNTER)
    set_results(page, K)
    yield page
    page.close()


def api_search(site, route: str, **params) -> list[int]:
    """The indices the HTTP API answers for the same search (the reference)."""
    _, url, _ = site
    params = {"k": K, "collapse": "true", **params}
    if route == "image":
        photo = Path(params.pop("photo"))
        r = httpx.post(f"{url}api/search/image", params=params, files={"file": (photo.name, photo.read_bytes())},
                       timeout=60)
    else:
        r = httpx.get(f"{url}api/search/{route}", params=params, timeout=60)
    r.raise_for_status()
    return [hit["index"] for hit in r.json()["results"]]


def sent_count(page) -> int:
    return page.evaluate("window.nanodbEvents.sent.length")


def type_query(page, text: str) -> None:
    """Type `text` over the query, key by key (as a person does: each key is an input event)."""
    box = page.locator("#query textarea")
    box.press("Control+A")
    box.press_sequentially(text)


def type_and_wait_until_sent(page, text: str) -> None:
    """Type `text` as the query, and wait until the browser has sent a search for it (debounced)."""
    before = sent_count(page)
    type_query(page, text)
    page.wait_for_function(f"() => window.nanodbEvents.sent.slice({before}).some(body => body.includes({text!r}))")


def settle(page) -> None:
    """Wait until the latest search the browser started (window.nanodbSeq) was sent, no upload runs, every
    event sent was answered, and nothing was sent or answered for 0.5 s: whatever an older search could
    still change has then arrived. (Without the first condition, a keystroke's search still waiting out
    its debounce on a busy machine, typing having outlasted the 0.5 s, was checked before it was sent.)"""
    page.wait_for_function(SETTLED, polling=100)


# Whether the page has settled (see settle): a sent body is Gradio's queue/join JSON, its `data` the event's
# inputs, the search request ({seq, kind, ...}) among them.
SETTLED = """() => {
  const e = window.nanodbEvents, seq = window.nanodbSeq;
  const carries = body => { try { return JSON.parse(body).data.some(d => d && d.seq === seq); }
                            catch { return false; } };
  return (seq === undefined || e.sent.some(carries)) && e.uploading === 0 && e.sent.length === e.answered &&
         performance.now() - e.last > 500;
}"""


def check(page, failures: list, try_: int, want_status: list[str], want_tiles: list[int]) -> None:
    settle(page)
    shown, line = shown_indices(page), status(page)
    if shown != want_tiles or not all(part in line for part in want_status):
        failures.append(f"try {try_}: status {line!r}, tiles {shown}; wanted {want_status}, tiles {want_tiles}")


@pytest.mark.parametrize("tries", TRIES)
def test_typing_then_at_once_similar_to_this_shows_the_similar_images(page, site, tries):
    db, _, _ = site
    page.locator("#query textarea").fill("a photo")
    page.locator("#query textarea").press("Enter")
    wait_for_status(page, "a photo")
    failures = []
    for n in range(tries):
        click_tile(page, n % K)
        item = shown_indices(page)[n % K]
        text = f"a {WORDS[n % len(WORDS)]} {n}"
        if n % 3:  # the text search is on its way when the button is clicked
            type_and_wait_until_sent(page, text)
        else:  # the keystroke's search is still waiting out its debounce
            type_query(page, text)
        page.locator("#lightbox-similar").click()
        check(page, failures, n, [f"similar to {Path(db.path_of(item)).name}"], api_search(site, f"item/{item}"))
    assert not failures, f"{len(failures)} of {tries} tries ended on an older action's results:\n" + \
        "\n".join(failures)


@pytest.mark.parametrize("tries", TRIES)
def test_typing_changing_a_filter_and_typing_again_shows_the_last_text_filtered(page, site, tries):
    _, _, photos = site
    folder_a = str(photos[0].parent)
    failures = []
    for n in range(tries):
        folder = folder_a if n % 2 == 0 else ""
        type_and_wait_until_sent(page, f"a {WORDS[n % len(WORDS)]} {n}")
        page.locator("#folder textarea").fill(folder)
        page.locator("#folder textarea").press("Enter")
        last = f"the {WORDS[(n + 5) % len(WORDS)]} {n}"
        type_query(page, last)
        want = api_search(site, "text", q=last, **({"folder": folder} if folder else {}))
        check(page, failures, n, [last] + (["(filtered)"] if folder else []), want)
        if not folder and "(filtered)" in status(page):
            failures.append(f"try {n}: the filter was cleared, yet the status says filtered")
    assert not failures, f"{len(failures)} of {tries} tries ended on an older action's results:\n" + \
        "\n".join(failures)


@pytest.mark.parametrize("tries", TRIES)
def test_dropping_an_image_while_a_text_search_runs_shows_the_images_results(page, site, tries):
    _, _, photos = site
    failures = []
    for n in range(tries):
        photo = photos[(5 * n) % len(photos)]
        type_and_wait_until_sent(page, f"a {WORDS[n % len(WORDS)]} {n}")
        uploads = page.evaluate("window.nanodbEvents.uploads")
        page.locator("#image-query input[type=file]").set_input_files(str(photo))
        page.wait_for_function(f"() => window.nanodbEvents.uploads > {uploads}")  # settle() then waits for it
        check(page, failures, n, ["the uploaded image"], api_search(site, "image", photo=photo))
    assert not failures, f"{len(failures)} of {tries} tries ended on an older action's results:\n" + \
        "\n".join(failures)
