"""predict: names and probabilities for real photos, any colour mode; bad files skipped."""
import pytest
from PIL import Image

from scarlet_deploy.runtime.cli import main
from scarlet_deploy.runtime.predict import predict


@pytest.fixture(scope="module")
def photos(val_files, tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    tench = next(f for f in val_files if f.parent.name == "n01440764")
    Image.open(tench).convert("CMYK").save(d / "tench_cmyk.jpg")
    Image.open(tench).convert("L").save(d / "tench_grey.jpg")
    (d / "notes.jpg").write_text("not an image")
    return tench, d


def test_top5_with_names_for_rgb_cmyk_and_greyscale(lite0_onnx, photos):
    tench, d = photos
    preds, skipped = predict(lite0_onnx, [str(tench), str(d / "tench_cmyk.jpg"), str(d / "tench_grey.jpg"), str(d / "notes.jpg")])
    assert [p.top[0][:2] for p in preds[:2]] == [(0, "tench")] * 2
    assert len(preds) == 3 and all(len(p.top) == 5 and 0 < p.top[0][2] <= 1 for p in preds)
    assert [s[0] for s in skipped] == [str(d / "notes.jpg")]


def test_cli_without_any_readable_image_fails(lite0_onnx, photos, capsys):
    _, d = photos
    assert main(["predict", "--onnx", str(lite0_onnx), str(d / "notes.jpg")]) == 2
    assert "skipped" in capsys.readouterr().err
