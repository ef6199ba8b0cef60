"""Near-duplicates (NanoDB.near_duplicates) equal the connected components of a float64 brute-force
self-join of the stored vectors (two frames of one video never paired): on real photos and their edited
copies, and on synthetic vectors."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
from helpers import coco_photos
from PIL import Image, ImageEnhance

from nanodb import NanoDB
from nanodb.search.duplicates import near_duplicates


def brute_force_groups(vectors: np.ndarray, live: np.ndarray, threshold: float,
                       videos: list[str | None] | None = None) -> set[frozenset[int]]:
    """Components of more than one live row joined by float64 dot >= threshold, or identical vectors,
    except two rows of one video (`videos`: each row's video path, None for a photo)."""
    rows = vectors[live].astype(np.float64)
    joined = rows @ rows.T >= threshold
    joined |= (vectors[live][:, None, :] == vectors[live][None, :, :]).all(axis=2)
    if videos is not None:
        of = [videos[i] for i in live]
        joined &= ~np.array([[a is not None and a == b for b in of] for a in of])
    label = list(range(len(live)))

    def find(x):
        while label[x] != x:
            x = label[x]
        return x

    for a, b in zip(*np.nonzero(joined)):
        ra, rb = find(int(a)), find(int(b))
        if ra != rb:
            label[max(ra, rb)] = min(ra, rb)
    components: dict[int, set[int]] = {}
    for j, row in enumerate(live):
        components.setdefault(find(j), set()).add(int(row))
    return {frozenset(c) for c in components.values() if len(c) > 1}


def found_groups(groups) -> set[frozenset[int]]:
    return {frozenset(g.indices) for g in groups}


def check_group_shape(db: NanoDB, groups) -> None:
    """Largest first; each group its lowest index first, then by similarity to it (float64, recomputed)."""
    assert [len(g) for g in groups] == sorted((len(g) for g in groups), reverse=True)
    vectors = db.vectors.astype(np.float64)
    for g in groups:
        first = g.items[0]
        assert first.index == min(g.indices) and first.similarity == 1.0
        assert first.path == db[first.index].path
        sims = [m.similarity for m in g.items[1:]]
        assert sims == sorted(sims, reverse=True)
        for m in g.items[1:]:
            want = 1.0 if np.array_equal(db.vectors[m.index], db.vectors[first.index]) else vectors[m.index] @ vectors[
                first.index]
            assert m.similarity == pytest.approx(min(want, 1.0), abs=1e-12)


# ----------------------------------------------------------------------------- real photos


def edited_copies(src, folder) -> list:
    """`src`'s resized, re-encoded, cropped and recoloured copies, and a byte-identical one."""
    im = Image.open(src).convert("RGB")
    w, h = im.size
    stem = src.stem
    im.resize((w // 2, h // 2), Image.LANCZOS).save(folder / f"{stem}_half.png")
    im.save(folder / f"{stem}_q20.jpg", quality=20)
    im.crop((w // 10, h // 10, w - w // 10, h - h // 10)).save(folder / f"{stem}_crop.jpg", quality=90)
    ImageEnhance.Color(ImageEnhance.Brightness(im).enhance(1.15)).enhance(1.6).save(folder / f"{stem}_warm.jpg")
    shutil.copyfile(src, folder / f"{stem}_copy.jpg")
    return [folder / f"{stem}{s}" for s in ("_half.png", "_q20.jpg", "_crop.jpg", "_warm.jpg", "_copy.jpg")]


@pytest.fixture(scope="module")
def photos_db(tmp_path_factory):
    """Eight COCO photos (copied), three of them with four edited copies and a byte-identical one each."""
    folder = tmp_path_factory.mktemp("dups") / "photos"
    folder.mkdir()
    originals = []
    for src in coco_photos(8):
        originals.append(folder / src.name)
        shutil.copyfile(src, originals[-1])
    variants = {o.name: edited_copies(o, folder) for o in originals[:3]}
    path = folder.parent / "db"
    with NanoDB(path, config="test") as db:
        report = db.scan(folder)
        assert report.added == 8 + 3 * 5, report.summary()
        db.save()
    return path, originals, variants


def test_photo_groups_equal_a_float64_brute_force_self_join(photos_db):
    path, originals, variants = photos_db
    with NanoDB(path, read_only=True) as db:
        live = np.arange(len(db))
        vectors = db.vectors
        scores = vectors.astype(np.float64) @ vectors.astype(np.float64).T
        pairs = scores[np.triu_indices(len(db), 1)]
        # thresholds spread over the pairs' similarities (random weights make unrelated photos close too)
        for threshold in [0.95, 0.99, 1.0, *np.quantile(pairs, [0.5, 0.9, 0.97, 0.99])]:
            groups = db.near_duplicates(threshold)
            assert found_groups(groups) == brute_force_groups(vectors, live, threshold), threshold
            check_group_shape(db, groups)
        # an edited copy is closer to its original than the least similar pair: at that pair's score, one group
        original = {name: db.index_of(next(p for p in originals if p.name == name)) for name in variants}
        lowest = min(scores[original[name], db.index_of(c)] for name, copies in variants.items() for c in copies)
        by_item = {i: g for g in db.near_duplicates(float(lowest)) for i in g.indices}
        for name, copies in variants.items():
            assert {db.index_of(c) for c in copies} <= set(by_item[original[name]].indices)
        # a byte-identical copy shares the vector: in its original's group even at threshold 1.0
        exact = found_groups(db.near_duplicates(1.0))
        for name, copies in variants.items():
            assert any({original[name], db.index_of(copies[-1])} <= g for g in exact)


def test_deleted_photos_leave_their_groups(photos_db, tmp_path):
    path, originals, variants = photos_db
    shutil.copytree(path, tmp_path / "db")
    with NanoDB(tmp_path / "db") as db:
        copies = variants[originals[0].name]
        gone = [db.index_of(originals[0]), db.index_of(copies[-1]), db.index_of(originals[5])]
        db.delete(gone)
        live = np.setdiff1d(np.arange(len(db.vectors)), gone)
        for threshold in (0.99, 1.0):
            after = db.near_duplicates(threshold)
            assert found_groups(after) == brute_force_groups(db.vectors, live, threshold)
            assert not set(gone) & {i for g in after for i in g.indices}


# ----------------------------------------------------------------------------- synthetic vectors


@pytest.fixture
def vectors_db(tmp_path):
    """Clusters of directions at several spreads, identical copies, and unrelated vectors."""
    rng = np.random.default_rng(7)
    db = NanoDB(tmp_path / "db", config="test")
    centres = rng.standard_normal((12, db.dim))
    spread = np.repeat([0.05, 0.15, 0.3, 0.5], 3)[:, None]
    members = np.repeat(centres, 5, axis=0) + np.repeat(spread, 5, axis=0) * rng.standard_normal((60, db.dim))
    copies = np.repeat(members[:1], 20, axis=0)  # 20 more of one vector: more than the first k asked
    vectors = np.concatenate([members, copies, rng.standard_normal((40, db.dim))])
    order = rng.permutation(len(vectors))  # groups spread over the rows (and the query blocks)
    db.add(vectors[order], paths=[f"/photos/img{i:03d}.jpg" for i in range(len(vectors))])
    yield db
    db.close()


@pytest.mark.parametrize("block", [512, 7])
def test_vector_groups_equal_the_brute_force_at_every_threshold(vectors_db, block):
    db = vectors_db
    live = np.arange(len(db))
    for threshold in (0.3, 0.6, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0):
        groups = near_duplicates(db.store, threshold, block=block)
        assert found_groups(groups) == brute_force_groups(db.vectors, live, threshold), threshold
        check_group_shape(db, groups)
    assert max(len(g) for g in db.near_duplicates(0.999)) >= 21  # the copies, found past k = 8


def test_deleted_items_are_excluded(vectors_db):
    db = vectors_db
    groups = db.near_duplicates(0.9)
    gone = [g.indices[0] for g in groups[:3]] + groups[0].indices[1:3]
    db.delete(gone)
    live = np.setdiff1d(np.arange(len(db.vectors)), gone)
    after = near_duplicates(db.store, 0.9, block=16)
    assert found_groups(after) == brute_force_groups(db.vectors, live, 0.9)
    assert not set(gone) & {i for g in after for i in g.indices}


def test_a_pair_exactly_at_the_threshold_is_joined_and_just_above_it_is_not(tmp_path):
    """e0 and a vector whose first value is s: their float64 similarity is exactly s (stored float16)."""
    with NanoDB(tmp_path / "db", config="test") as db:
        rng = np.random.default_rng(3)
        a = np.zeros(db.dim)
        a[0] = 1
        b = np.zeros(db.dim)
        b[0], b[1] = 0.95, np.sqrt(1 - 0.95**2)
        noise = rng.standard_normal((30, db.dim))
        db.add(np.concatenate([noise[:15], a[None], noise[15:], b[None]]), paths=[f"/v/{i}" for i in range(32)])
        ia, ib = 15, 31
        s = float(db.vectors[ib].astype(np.float64) @ db.vectors[ia].astype(np.float64))
        assert s == float(db.vectors[ib][0])  # exact: every other product is zero
        at = db.near_duplicates(s)
        assert {ia, ib} in [set(g.indices) for g in at]
        assert at[0].items[1].similarity == s
        above = db.near_duplicates(float(np.nextafter(s, 2.0)))
        assert not any({ia, ib} <= set(g.indices) for g in above)
        below = db.near_duplicates(float(np.nextafter(s, 0.0)))
        assert {ia, ib} in [set(g.indices) for g in below]


def test_min_size_and_bad_thresholds(vectors_db):
    db = vectors_db
    groups = db.near_duplicates(0.9)
    assert db.near_duplicates(0.9, min_size=len(groups[0])) == [g for g in groups if len(g) >= len(groups[0])]
    assert db.near_duplicates(0.9, min_size=0) == groups  # groups have two items at least
    for bad in (0, -0.5, 1.01, float("nan"), "high"):
        with pytest.raises(ValueError, match="threshold"):
            db.near_duplicates(bad)


def test_an_empty_database_has_no_groups(tmp_path):
    with NanoDB(tmp_path / "db", config="test") as db:
        assert db.near_duplicates() == []
        db.add(np.ones((1, db.dim)), paths=["/one"])
        assert db.near_duplicates() == []


def test_the_duplicates_command_prints_the_api_groups_as_lines_and_json(photos_db, capsys):
    from nanodb.interfaces.cli import main

    path, _, _ = photos_db
    with NanoDB(path, read_only=True) as db:
        want = db.near_duplicates(0.99)
    assert want
    capsys.readouterr()
    assert main(["duplicates", "--path", str(path), "--threshold", "0.99", "--json"]) == 0
    out, err = capsys.readouterr()
    assert [json.loads(line) for line in out.splitlines()] == [{"group": n, **g.to_dict()}
                                                              for n, g in enumerate(want, 1)]
    assert err == f"nanodb: {len(want)} groups of near-duplicates at similarity >= 0.99 " \
                  f"({sum(len(g) for g in want)} items)\n"
    assert main(["duplicates", "--path", str(path), "--threshold", "0.99"]) == 0
    out, _ = capsys.readouterr()
    blocks = out.split("\n\n")
    assert len(blocks) == len(want)
    for n, (block, group) in enumerate(zip(blocks, want), 1):
        header, *lines = block.strip("\n").splitlines()
        assert header == f"group {n}: {len(group)} items"
        assert lines == [str(m) for m in group]
        assert all(re.fullmatch(r"\* index=\d+  .+  similarity=\d\.\d{4}", line) for line in lines)


def test_a_partner_ranked_past_the_first_k_is_found(tmp_path):
    """Row 0 has ten closer neighbours than x; x (in a later block, so only row 0's query can find the
    pair) is similar enough to row 0 alone: the join must ask row 0's query for more than k results."""
    with NanoDB(tmp_path / "db", config="test") as db:
        dim = db.dim
        p = np.eye(dim)[0]
        close = 0.999 * p + np.sqrt(1 - 0.999**2) * np.eye(dim)[2:12]  # ten rows at 0.999 to row 0
        x = 0.96 * p + 0.28 * np.eye(dim)[1]  # 0.96 to row 0, 0.959 to the ten
        noise = np.random.default_rng(5).standard_normal((19, dim))
        db.add(np.concatenate([p[None], close, noise, x[None]]), paths=[f"/v/{i}" for i in range(31)])
        threshold = float(db.vectors[30].astype(np.float64) @ db.vectors[0].astype(np.float64))
        assert (db.vectors[1:11].astype(np.float64) @ db.vectors[30].astype(np.float64) < threshold).all()
        groups = near_duplicates(db.store, threshold, block=7)
        assert found_groups(groups) == {frozenset(range(11)) | {30}}
        assert found_groups(groups) == brute_force_groups(db.vectors, np.arange(31), threshold)


def test_frames_of_one_video_are_not_near_duplicates_of_each_other(tmp_path):
    """Frames of one video (similar scenes of one shot, even identical ones) never pair; a frame pairs
    with a photo or with a frame of another video, and two frames of one video can share a group only
    through such an item."""
    rng = np.random.default_rng(11)
    base = rng.standard_normal((4, 384))
    noise = lambda v: v + 0.05 * rng.standard_normal(384)  # noqa: E731
    vectors = np.stack([noise(base[0]), noise(base[0]), noise(base[0]),  # 0-2: frames of a.mp4, one scene
                        base[1], base[1],  # 3-4: identical frames of a.mp4 (a still shot)
                        noise(base[2]), noise(base[2]),  # 5: frame of b.MKV, 6: a photo like it
                        noise(base[3]), noise(base[3]),  # 7: frame of a.mp4, 8: frame of c.webm like it
                        *rng.standard_normal((20, 384))])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    videos = ["/v/a.mp4"] * 5 + ["/v/b.MKV", None, "/v/a.mp4", "/v/c.webm"] + [None] * 20
    paths = [v or f"/p/{i}.jpg" for i, v in enumerate(videos)]
    metadata = [{"time": float(i)} if v else None for i, v in enumerate(videos)]
    with NanoDB(tmp_path / "db", config="test") as db:
        db.add(vectors, paths=paths, metadata=metadata)
        live = np.arange(len(vectors))
        for threshold in (0.9, 0.99, 0.3, 0.05):
            groups = db.near_duplicates(threshold)
            assert found_groups(groups) == brute_force_groups(db.vectors, live, threshold, videos), threshold
        assert found_groups(db.near_duplicates(0.9)) == {frozenset({5, 6}), frozenset({7, 8})}


def test_unlocked_groups_equal_the_locked_ones_and_leave_out_rows_deleted_meanwhile(vectors_db):
    db = vectors_db
    for threshold in (0.8, 0.95, 1.0):
        locked = db.near_duplicates(threshold)
        assert found_groups(db.near_duplicates(threshold, unlocked=True)) == found_groups(locked)
    state = db.state
    biggest = db.near_duplicates(0.8)[0]
    db.delete([biggest.indices[-1]])
    assert db.state != state
    after = db.near_duplicates(0.8, unlocked=True)
    assert all(biggest.indices[-1] not in g.indices for g in after)
    assert found_groups(after) == found_groups(db.near_duplicates(0.8))


def test_a_threshold_nearly_every_pair_reaches_is_one_group_in_bounded_memory(tmp_path):
    """threshold=1e-300 on 20K items took over 5 GB: every candidate pair's vectors were copied to float64
    at once. Memory is now one search's results, and the join stops once every row is one group."""
    import tracemalloc

    rng = np.random.default_rng(5)
    with NanoDB(tmp_path / "db", config="test") as db:
        db.add(np.abs(rng.standard_normal((600, db.dim))), paths=[f"/v/{i}" for i in range(600)])
        tracemalloc.start()
        try:
            groups = db.near_duplicates(1e-300)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert [sorted(g.indices) for g in groups] == [list(range(600))]
        assert peak < 64 << 20, f"{peak >> 20} MiB traced"
        vectors = rng.standard_normal((300, db.dim))  # half the pairs reach 0.01: many groups' worth of pairs
        db.add(vectors, paths=[f"/w/{i}" for i in range(300)])
        db.delete(list(range(600)))
        live = np.arange(600, 900)
        for threshold in (1e-300, 0.01, 0.1):
            assert found_groups(near_duplicates(db.store, threshold, block=64)) == \
                brute_force_groups(db.vectors, live, threshold), threshold
