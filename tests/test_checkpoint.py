"""Checkpoints load as released, and every wrong input is a clear error, never a traceback."""
import pytest
import torch

from scarlet_deploy.export.checkpoint import identify, load_model
from scarlet_deploy.export.registry import get_spec
from scarlet_deploy.runtime.cli import main
from scarlet_deploy.runtime.core.errors import ScarletError


@pytest.fixture(scope="module")
def b_state():
    torch.manual_seed(0)
    return get_spec("scarlet_b").create().state_dict()


def _save(tmp_path, obj, name="ckpt.pth.tar"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("wrap", ["official", "bare", "dataparallel"])
def test_checkpoint_formats_round_trip(tmp_path, b_state, wrap):
    sd = {"official": {"model_state": b_state}, "bare": b_state,
          "dataparallel": {"model_state": {"module." + k: v for k, v in b_state.items()}}}[wrap]
    lm = load_model("scarlet_b", checkpoint=_save(tmp_path, sd))
    assert lm.pretrained and len(lm.checkpoint_sha256) == 64
    for k, v in lm.model.state_dict().items():
        assert torch.equal(v, b_state[k]), k


def test_num_batches_tracked_is_optional(tmp_path, b_state):
    sd = {k: v for k, v in b_state.items() if not k.endswith("num_batches_tracked")}
    load_model("scarlet_b", checkpoint=_save(tmp_path, sd))


def test_identify_names_the_model(b_state):
    assert identify(b_state) == [("scarlet_b", False)]
    assert identify(get_spec("scarlet_c").create(let=True).state_dict()) == [("scarlet_c", True)]


@pytest.mark.parametrize("case,needle", [
    ("missing", "does not exist"),
    ("directory", "is a directory"),
    ("truncated", "truncated, corrupt"),
    ("garbage", "truncated, corrupt"),
    ("code", "could run code"),
    ("other_model", "it matches scarlet_c"),
    ("let", "scarlet_b with --let"),
    ("keys", "missing keys"),
    ("no_tensors", "holds no state_dict"),
])
def test_bad_checkpoints_are_clear_errors(tmp_path, b_state, capsys, case, needle):
    good = _save(tmp_path, {"model_state": b_state}, "good.pth")
    if case == "missing":
        path = tmp_path / "nope.pth"
    elif case == "directory":
        path = tmp_path
    elif case == "truncated":
        path = tmp_path / "cut.pth"
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif case == "garbage":
        path = tmp_path / "junk.pth"
        path.write_bytes(b"this is not a checkpoint" * 100)
    elif case == "code":
        path = tmp_path / "code.pth"
        torch.save({"model_state": b_state, "cfg": _Config()}, path)
    elif case == "other_model":
        path = _save(tmp_path, {"model_state": get_spec("scarlet_c").create().state_dict()})
    elif case == "let":
        path = _save(tmp_path, {"model_state": get_spec("scarlet_b").create(let=True).state_dict()})
    elif case == "keys":
        sd = dict(b_state)
        del sd["classifier.bias"]
        sd["extra.weight"] = torch.zeros(1)
        path = _save(tmp_path, sd)
    else:
        path = _save(tmp_path, {"model_state": {"epoch": 3}})
    with pytest.raises(ScarletError, match=needle):
        load_model("scarlet_b", checkpoint=path)
    try:
        rc = main(["export", "--model", "scarlet_b", "--checkpoint", str(path), "-o", str(tmp_path / "out.onnx")])
    except SystemExit as e:  # a folder is refused while parsing: a usage error
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.startswith("usage:") and "is a folder, not a file" in err if case == "directory" else err.startswith("error:")
    assert not (tmp_path / "out.onnx").exists()


def test_unexpected_and_missing_keys_are_listed(tmp_path, b_state):
    sd = dict(b_state)
    del sd["classifier.bias"]
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(ScarletError) as e:
        load_model("scarlet_b", checkpoint=_save(tmp_path, sd))
    assert "classifier.bias" in str(e.value) and "extra.weight" in str(e.value)


class _Config:
    pass
