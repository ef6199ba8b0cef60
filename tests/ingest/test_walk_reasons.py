"""The reason the walk gives for a file it skips says what is wrong with it."""

from __future__ import annotations

import os
from pathlib import Path

from nanodb.pipeline.walk import DirectoryWalker


def test_a_broken_symlink_is_reported_as_broken_wherever_it_pointed(tmp_path):
    folder = tmp_path / "photos"
    (folder / "trip").mkdir(parents=True)
    os.symlink("/media/usb-stick-long-gone/IMG_0001.jpg", folder / "away.jpg")  # its target was elsewhere
    os.symlink("no-such-file.jpg", folder / "near.jpg")  # a relative target in the folder
    os.symlink("/media/usb-stick-long-gone/trip", folder / "trip" / "old album")  # a folder link
    (tmp_path / "outside.jpg").write_bytes(b"not scanned")
    os.symlink(tmp_path / "outside.jpg", folder / "leads-out.jpg")  # a link that works, out of the folder
    walker = DirectoryWalker([str(folder)])
    assert list(walker) == []
    reasons = {Path(p.path).name: p.reason for p in walker.problems}
    assert reasons == {"away.jpg": "broken link", "near.jpg": "broken link",
                       "leads-out.jpg": "symlink leads outside the scanned folders"}
