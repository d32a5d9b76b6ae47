"""verify's state between runs: the reference-logit cache and the resume journal, on their own."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from scarlet_deploy.runtime.verify.journal import Journal
from scarlet_deploy.runtime.verify.reference_cache import ReferenceCache, ReferenceKey, image_list_sha256


def _key(images: int = 5, **kw) -> ReferenceKey:
    fields = dict(model="scarlet_a", let=False, weights="sha256:" + "a" * 64,
                  preprocess={"resize": 256, "crop": 224, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)},
                  code="c" * 64, torch="2.13.0", images=images, image_list_sha256="i" * 64, classes=8)
    return ReferenceKey(**{**fields, **kw})


def _fill(cache: ReferenceCache, key: ReferenceKey, logits: np.ndarray, skipped: dict[int, str] | None = None):
    w = cache.writer(key, keep_rows=False)
    order = np.random.default_rng(0).permutation(key.images)  # rows arrive in any order (resumed runs)
    for p in order:
        w.write([int(p)], logits[p:p + 1])
    return w.commit(skipped or {}, {"device": "cpu", "images_per_s": 12.5})


def test_cached_rows_come_back_exactly_and_the_entry_says_where_from(tmp_path):
    cache, key = ReferenceCache(tmp_path), _key()
    logits = np.random.default_rng(1).normal(size=(5, 8)).astype(np.float32)
    entry = _fill(cache, key, logits, {3: "unreadable"})
    entry.close()
    hit, why = cache.lookup(key)
    assert why is None and hit is not None
    np.testing.assert_array_equal(hit.logits([0, 1, 2, 3, 4]), logits)
    np.testing.assert_array_equal(hit.logits([4, 1]), logits[[4, 1]])  # any order, gaps
    assert hit.skipped == {3: "unreadable"} and hit.meta["device"] == "cpu" and hit.meta["created"]
    assert np.load(hit.folder / "logits.npy", mmap_mode="r").shape == (5, 8)  # plain .npy, memory-mappable
    assert not list(tmp_path.glob(".partial-*"))
    hit.close()


def test_any_key_field_changes_the_entry(tmp_path):
    cache = ReferenceCache(tmp_path)
    _fill(cache, _key(), np.ones((5, 8), np.float32)).close()
    for other in (_key(weights="sha256:" + "b" * 64), _key(let=True), _key(image_list_sha256="j" * 64),
                  _key(preprocess={"resize": 256, "crop": 224, "mean": (0.5,) * 3, "std": (0.5,) * 3}),
                  _key(code="d" * 64), _key(torch="2.14.0")):
        assert cache.lookup(other) == (None, None)


@pytest.mark.parametrize("damage,why", [("flip", "does not match the sha256"), ("truncate", "truncated"),
                                        ("meta", "not JSON"), ("nan", "NaN")])
def test_a_damaged_entry_is_ignored_with_a_note(tmp_path, damage, why):
    cache, key = ReferenceCache(tmp_path), _key()
    entry = _fill(cache, key, np.ones((5, 8), np.float32))
    entry.close()
    logits, meta = entry.folder / "logits.npy", entry.folder / "meta.json"
    data = bytearray(logits.read_bytes())
    if damage == "flip":
        data[-3] ^= 0x10
        logits.write_bytes(bytes(data))
    elif damage == "truncate":
        logits.write_bytes(bytes(data[:-40]))
    elif damage == "meta":
        meta.write_text(meta.read_text()[:50])
    else:
        data[-4:] = np.float32(np.nan).tobytes()
        logits.write_bytes(bytes(data))
        m = json.loads(meta.read_text())  # consistent hash: only the NaN check can catch it
        m["logits_sha256"] = hashlib.sha256(bytes(data[len(data) - 5 * 8 * 4:])).hexdigest()
        meta.write_text(json.dumps(m))
    hit, note = cache.lookup(key)
    assert hit is None and "ignored the cached reference" in note and why in note


def test_an_unfinished_entry_is_never_found_and_a_resumed_writer_keeps_its_rows(tmp_path):
    cache, key = ReferenceCache(tmp_path), _key()
    w = cache.writer(key, keep_rows=False)
    w.write([0, 1], np.full((2, 8), 7, np.float32))
    w.sync()
    w.close()  # interrupted here
    assert cache.lookup(key) == (None, None)
    w = cache.writer(key, keep_rows=True)
    assert w.kept_rows
    w.write([2, 3, 4], np.full((3, 8), 9, np.float32))
    entry = w.commit({}, {})
    np.testing.assert_array_equal(entry.logits([0, 4])[:, 0], [7, 9])
    entry.close()


def test_two_writers_of_one_entry_exclude_each_other(tmp_path):
    cache, key = ReferenceCache(tmp_path), _key()
    w = cache.writer(key, keep_rows=False)
    with pytest.raises(BlockingIOError, match="another verify"):
        cache.writer(key, keep_rows=False)
    w.discard()


def test_image_list_hash_sees_edits_renames_and_order(tmp_path):
    a, b = tmp_path / "a.JPEG", tmp_path / "b.JPEG"
    a.write_bytes(b"1")
    b.write_bytes(b"2")
    base = image_list_sha256([a, b])
    assert image_list_sha256([b, a]) != base
    os.utime(a, ns=(1, 1))
    assert image_list_sha256([a, b]) != base
    changed = image_list_sha256([a, b])
    a.write_bytes(b"12")
    os.utime(a, ns=(1, 1))
    assert image_list_sha256([a, b]) != changed  # same mtime, other size


def _rows(pos: list[int]) -> dict[str, np.ndarray]:
    return {"pos": np.asarray(pos), "x": np.asarray(pos, np.float64) * 1.5, "why": np.asarray([""] * len(pos))}


def test_journal_resumes_whole_chunks_and_drops_a_broken_one(tmp_path):
    ident = {"reference_key": "k", "backends": []}
    j = Journal(tmp_path, ident, resume=False)
    j.append(_rows([0, 1, 2]), {"t.wall": 1.0})
    j.append(_rows([4, 3]), {"t.wall": 2.0})
    j.append(_rows([5]), {"t.wall": 4.0})
    chunks = sorted(j.folder.glob("chunk-*.npz"))
    chunks[-1].write_bytes(chunks[-1].read_bytes()[:30])  # what a crash mid-write cannot leave, a damaged disk can
    j.close()  # the interrupted run has exited
    r = Journal(tmp_path, ident, resume=True)
    assert r.done_positions() == {0, 1, 2, 3, 4} and r.resumed_images == 5
    assert any("dropped" in n for n in r.notes) and any("resumed" in n for n in r.notes)
    r.append(_rows([5]), {"t.wall": 8.0})
    cols = r.columns()
    assert cols["pos"].tolist() == [0, 1, 2, 3, 4, 5] and cols["x"].tolist() == [0, 1.5, 3, 4.5, 6, 7.5]
    assert cols["t.wall"] == 11.0
    r.finish()
    assert not r.folder.exists()


def test_journal_of_another_run_or_without_resume_starts_over(tmp_path):
    j = Journal(tmp_path, {"reference_key": "k"}, resume=False)
    j.append(_rows([0]), {})
    j.close()
    other = Journal(tmp_path, {"reference_key": "other"}, resume=True)
    assert not other.chunks and any("no interrupted run" in n for n in other.notes)
    again = Journal(tmp_path, {"reference_key": "k"}, resume=False)
    assert not again.chunks and any("--resume" in n for n in again.notes)
    assert not list(Path(again.folder).glob("chunk-*"))


def test_journal_files_after_resume_hold_every_image_once_and_no_chunk_is_overwritten(tmp_path):
    # What a second interruption finds on disk: the chunks of both sessions, none written over another.
    ident = {"reference_key": "k", "backends": []}
    first = Journal(tmp_path, ident, resume=False)
    for part in ([0, 1], [2, 3], [4]):
        first.append(_rows(part), {"t.wall": 1.0})
    first.close()
    second = Journal(tmp_path, ident, resume=True)
    assert second.done_positions() == {0, 1, 2, 3, 4}
    for part in ([5, 6], [7]):
        second.append(_rows(part), {"t.wall": 1.0})
    second.close()
    files = sorted(second.folder.glob("chunk-*.npz"))
    assert [f.name for f in files] == [f"chunk-{n:06d}.npz" for n in range(1, 6)]
    on_disk = [int(p) for f in files for p in np.load(f)["pos"]]
    assert sorted(on_disk) == list(range(8)), "every image in exactly one chunk file"
    third = Journal(tmp_path, ident, resume=True)
    assert third.resumed_images == 8 and third.columns()["pos"].tolist() == list(range(8))


def _reference_key(monkeypatch, preprocess=None, torch_version: str | None = None, source_edit=None, tmp_path=None):
    """The key `verify` files PyTorch's logits under, for one small model on two images."""
    from types import SimpleNamespace

    import torch

    from scarlet_deploy.runtime.data import preprocess as pre
    from scarlet_deploy.runtime.verify import run as vrun

    with monkeypatch.context() as m:
        if torch_version:
            m.setattr(torch, "__version__", torch_version)
        if source_edit:  # the preprocessing code as another checkout would have it
            edited = tmp_path / "preprocess.py"
            edited.write_text(source_edit(Path(pre.__file__).read_text()))
            m.setattr(pre, "__file__", str(edited))
        loaded = SimpleNamespace(name="scarlet_a", let=False, pretrained=True, checkpoint_sha256="a" * 64,
                                 model=torch.nn.Linear(2, 2))
        ds = SimpleNamespace(items=[SimpleNamespace(path=Path(f)) for f in (vrun.__file__, torch.__file__)])
        return vrun.reference_key(loaded, 0, preprocess or pre.Preprocess(), ds)


def test_the_reference_key_moves_with_torch_and_every_preprocessing_parameter(monkeypatch, tmp_path):
    from dataclasses import replace

    from scarlet_deploy.runtime.data.preprocess import Preprocess

    p = Preprocess()
    base = _reference_key(monkeypatch, p)
    assert _reference_key(monkeypatch, p).digest() == base.digest(), "the same run finds its entry"
    others = {
        "torch": _reference_key(monkeypatch, p, torch_version="99.0.0"),
        "resize": _reference_key(monkeypatch, replace(p, resize=p.resize + 1)),
        "crop": _reference_key(monkeypatch, replace(p, crop=p.crop - 1)),
        **{f"mean[{c}]": _reference_key(monkeypatch, replace(p, mean=tuple(v + (i == c) * 1e-3 for i, v in enumerate(p.mean))))
           for c in range(3)},
        **{f"std[{c}]": _reference_key(monkeypatch, replace(p, std=tuple(v + (i == c) * 1e-3 for i, v in enumerate(p.std))))
           for c in range(3)},
        # what the Preprocess fields do not hold is in the code: interpolation and channel order
        "interpolation": _reference_key(monkeypatch, p, tmp_path=tmp_path,
                                        source_edit=lambda s: s.replace("Image.BILINEAR", "Image.NEAREST")),
        "channel order": _reference_key(monkeypatch, p, tmp_path=tmp_path,
                                        source_edit=lambda s: s.replace('im.convert("RGB")', 'im.convert("RGB").convert("BGR;24")')),
    }
    digests = {name: k.digest() for name, k in others.items()}
    assert base.digest() not in digests.values(), [n for n, d in digests.items() if d == base.digest()]
    assert len(set(digests.values())) == len(digests)
    assert others["torch"].torch == "99.0.0"
