"""A video in the web UI, in headless Chromium: its tile names the moment, its lightbox plays from it."""

from __future__ import annotations

import re
import shutil

import pytest
from helpers import coco_photos
from helpers.browser import ARTIFACTS, MARKS, click_tile, open_page, wait_for_images
from helpers.videos import SCENE_S, make_clip

from nanodb.database import NanoDB
from nanodb.interfaces.server import start_server

pytestmark = MARKS


@pytest.fixture(scope="module")
def video_site(tmp_path_factory):
    """The server's url and the photos: a two-scene VP8 clip (Chromium plays it) and a photo. Asked for
    before the browser: a scan runs its own event loop, which playwright's would prevent."""
    photos = coco_photos(3)
    tmp_path = tmp_path_factory.mktemp("video-browser")
    folder = tmp_path / "media"
    folder.mkdir()
    make_clip(folder / "clip.webm", photos[:2], codec="libvpx")
    shutil.copy2(photos[2], folder / "photo.jpg")
    with NanoDB(tmp_path / "db", config="test") as db:
        report = db.scan(folder)
        assert (report.added, report.failed) == (2, 0), report.failures
        server = start_server(db, "127.0.0.1", 0)
        try:
            yield server.url, photos
        finally:
            server.stop()


def test_a_videos_tile_names_its_moment_and_the_lightbox_plays_from_it(video_site, chromium_browser):
    url, photos = video_site
    page = open_page(chromium_browser, url)
    page.locator("#image-query input[type=file]").set_input_files(str(photos[1]))  # the clip's second scene
    page.wait_for_function("() => document.querySelector('#status')?.innerText.includes('the uploaded image')")
    wait_for_images(page)
    texts = page.locator("#results .caption-label").all_inner_texts()
    shown = re.match(r"clip\.webm (@ 00:00:0[345]) · ", texts[0])  # the video once, at a frame of that scene
    assert shown and len(texts) == 2, texts
    click_tile(page, 0)
    video = page.locator("#lightbox-view video")
    video.wait_for(state="attached")
    moment = float(video.get_attribute("data-time"))
    assert SCENE_S <= moment < 2 * SCENE_S and video.get_attribute("src").endswith(f"/original#t={moment:.3f}")
    assert f"clip.webm {shown[1]}" in page.locator("#lightbox-view .details").inner_text()
    # the browser loaded the video by ranges through the server and stands (or plays on) from the moment
    page.wait_for_function("""() => { const v = document.querySelector('#lightbox-view video');
        return v && v.readyState >= 1 && v.currentTime >= Number(v.dataset.time) - 0.05; }""")
    page.screenshot(path=ARTIFACTS / "web-lightbox-video.png")
    page.close()
