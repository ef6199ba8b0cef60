"""Load what is served: a server holds the text tower's export for text queries, loads a query image's
tower on the first image query and frees it after `image_tower_idle_seconds` unused (logged); a freed
tower is loaded again on the next image query and gives the same vectors."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time

import numpy as np
from helpers import REPO


def wait_freed(db, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while db.image_tower_loaded and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not db.image_tower_loaded


def test_a_freed_image_tower_is_loaded_again_and_gives_the_same_vectors(scanned_db, query_image, caplog):
    from nanodb import NanoDB

    def said(words: str) -> int:
        return sum(r.getMessage().startswith(words) for r in caplog.records)

    path, _ = scanned_db
    with caplog.at_level(logging.INFO, logger="nanodb"), \
            NanoDB(path, read_only=True, image_tower_idle_seconds=0.3) as db:
        db.search(text="a dog on a beach", k=4)
        assert said("nanodb: loading the image tower") == 0 and not db.model_loaded
        before = db.embed_query(query_image)
        found = db.search(str(query_image), k=8)
        wait_freed(db)
        assert said("freed the image tower of ViT-S-32 after") >= 1
        after = db.embed_query(query_image)
        again = db.search(str(query_image), k=8)
        assert said("nanodb: loading the image tower of ViT-S-32 (converted to OpenVINO):") >= 2
        assert not db.model_loaded
    assert np.array_equal(before, after)
    assert [(r.index, r.similarity) for r in found] == [(r.index, r.similarity) for r in again]


SERVER = """
import gc, json, logging, sys, time, httpx
from nanodb import NanoDB
from nanodb.interfaces.server import start_server

def towers():
    '''The image towers alive in this process: torch's (open_clip's vision transformer), OpenVINO's.'''
    gc.collect()
    names = [type(o).__name__ for o in gc.get_objects() if type(o).__name__ in ("VisionTransformer",
             "ExportedImageTower")]
    return {"torch": names.count("VisionTransformer"), "openvino": names.count("ExportedImageTower")}

logging.basicConfig(level=logging.INFO, format="%(message)s")
db = NanoDB(sys.argv[1], read_only=True, image_tower_idle_seconds=0.5)
server = start_server(db, "127.0.0.1", 0)
seen, results = {"started": towers()}, []
with httpx.Client(base_url=server.url + "api", timeout=300) as client:
    client.get("/search/text", params={"q": "a red car"}).raise_for_status()
    seen["text"] = towers()
    logging.info("text query answered")
    for when in ("image", "reloaded"):
        with open(sys.argv[2], "rb") as f:
            answer = client.post("/search/image", files={"file": f})
        results.append(answer.raise_for_status().json()["results"])
        seen[when] = towers()
        deadline = time.monotonic() + 60
        while db.image_tower_loaded and time.monotonic() < deadline:
            time.sleep(0.05)
        seen[when + " idle"] = towers()
server.stop()
db.close()
print(json.dumps({"towers": seen, "same": results[0] == results[1], "found": len(results[0])}))
"""


def test_a_server_loads_the_image_tower_on_the_first_image_query_and_frees_it_when_idle(scanned_db, query_image):
    """In a fresh process: a text query loads no image tower (torch's or OpenVINO's), an image query the
    converted one only (no torch model), freed when idle (logged); the image query after a free finds the
    same items."""
    path, _ = scanned_db
    run = subprocess.run([sys.executable, "-c", SERVER, str(path), str(query_image)], cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.splitlines()[-1])
    none = {"torch": 0, "openvino": 0}
    assert {when: out["towers"][when] for when in ("started", "text", "image idle", "reloaded idle")} == \
        dict.fromkeys(("started", "text", "image idle", "reloaded idle"), none)
    assert out["towers"]["image"]["torch"] == out["towers"]["reloaded"]["torch"] == 0
    loaded, freed = "nanodb: loading the image tower of ViT-S-32 (converted to OpenVINO): ", "freed the image tower"
    logged = [line[:len(loaded)] if line.startswith(loaded) else line[:len(freed)] for line in run.stderr.splitlines()
              if line.startswith(("text query answered", loaded, freed))]
    # a load after the text query, then each load freed before the next (a slow upload's decode may
    # outlast the idle time between the tower's two uses), at least once per image query
    assert logged[0] == "text query answered" and logged[1:] == [loaded, freed] * (len(logged) // 2), logged
    assert logged.count(loaded) >= 2
    assert out["same"] and out["found"] > 0
