"""Load a model with its weights: official checkpoints as they are, or seeded weights.

A checkpoint is read with `weights_only=True`: loading one must never run code.
Every way a checkpoint can be wrong ends in a ScarletError that says what to do.
"""
from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch
from torch import nn

from scarlet_deploy.export.registry import MODELS, get_spec
from scarlet_deploy.runtime.core.artifacts import sha256_file
from scarlet_deploy.runtime.core.errors import ScarletError

SEEDED = "seeded, not pretrained"
WRAPPER_KEYS = ("model_state", "state_dict", "model")


@dataclass
class LoadedModel:
    model: nn.Module
    name: str
    let: bool
    pretrained: bool
    checkpoint_sha256: str  # of the checkpoint file; for seeded weights "seeded:" + tensors_sha256
    source: str  # the checkpoint path, the package that shipped it, or SEEDED

    def describe(self) -> str:
        kind = "pretrained" if self.pretrained else "SEEDED WEIGHTS, NOT PRETRAINED"
        return f"{self.name}{' +LET' if self.let else ''} [{kind}] from {self.source}"


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint: `{"model_state": sd}` (SCARLET-NAS release), a bare
    state_dict, or either with DataParallel's `module.` prefix."""
    path = str(path)
    if not os.path.exists(path):
        raise ScarletError(f"checkpoint {path} does not exist; check the path (or omit --checkpoint for seeded weights).")
    if os.path.isdir(path):
        raise ScarletError(f"checkpoint {path} is a directory; pass the .pth/.pth.tar file inside it.")
    if os.path.getsize(path) == 0:
        raise ScarletError(f"checkpoint {path} is empty (0 bytes): the download or save did not finish; download or save it again.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "weights_only" in str(e):
            raise ScarletError(f"checkpoint {path} holds Python objects besides tensors, and loading it could run code; "
                               f"re-save just the state_dict: torch.save({{'model_state': model.state_dict()}}, path).") from None
        raise ScarletError(f"checkpoint {path} is corrupt or not a PyTorch checkpoint ({e}); download or save it again.") from None
    except Exception as e:  # noqa: BLE001 - torch.load on a damaged file raises almost anything
        if isinstance(e, MemoryError):
            raise
        raise ScarletError(f"checkpoint {path} cannot be read: it is truncated, corrupt or not a PyTorch checkpoint "
                           f"({(str(e).splitlines() or [type(e).__name__])[0][:160]}); download or save it again.") from None
    for key in WRAPPER_KEYS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ScarletError(f"checkpoint {path} holds no state_dict (expected tensors, or a dict with 'model_state'); "
                           "save it with torch.save({'model_state': model.state_dict()}, path).")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    bad = [k for k, v in obj.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        # NaN weights make NaN logits, and NaN compares False with every tolerance: refuse them at the source.
        raise ScarletError(f"checkpoint {path} has NaN or infinite values in {len(bad)} tensors (e.g. {', '.join(bad[:3])}): "
                           "training diverged or the file is damaged, and every output would be garbage. Use a checkpoint "
                           "saved before the divergence, or download it again.")
    return obj


def _shapes(sd: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes; BN's num_batches_tracked is optional in checkpoints."""
    return {k: tuple(v.shape) for k, v in sd.items() if not k.endswith("num_batches_tracked")}


@lru_cache(maxsize=None)
def _signature(name: str, let: bool) -> dict[str, tuple[int, ...]]:
    return _shapes(MODELS[name].create(let).state_dict())


def _variants() -> list[tuple[str, bool]]:
    return [(n, let) for n, s in MODELS.items() for let in ((False, True) if s.supports_let else (False,))]


def _label(name: str, let: bool) -> str:
    return f"{name} with --let" if let else name


def identify(sd: dict[str, torch.Tensor]) -> list[tuple[str, bool]]:
    """Every registered model (and LET variant) whose parameter names and shapes match `sd`."""
    sig = _shapes(sd)
    return [(n, let) for n, let in _variants() if _signature(n, let) == sig]


def _mismatch_message(path: str, name: str, let: bool, sd: dict[str, torch.Tensor]) -> str:
    matches = identify(sd)
    if matches:
        return (f"checkpoint {path} is not {_label(name, let)}: it matches {_label(*matches[0])}. "
                f"Rerun with --model {matches[0][0]}{' --let' if matches[0][1] else ''}.")
    want = _signature(name, let)
    got = _shapes(sd)
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    shapes = sorted(k for k in set(want) & set(got) if want[k] != got[k])
    parts = [f"checkpoint {path} does not fit {_label(name, let)}"]
    hint = _looks_like(got)
    if hint:
        parts.append(f"it looks like {hint}")
    if missing:
        parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches (e.g. {shapes[0]}: checkpoint {got[shapes[0]]}, model {want[shapes[0]]})")
    return "; ".join(parts) + ". Check --model/--let, or that the file is the checkpoint you meant."


def _looks_like(sig: dict[str, tuple[int, ...]]) -> Optional[str]:
    if any(k.startswith("_blocks.") for k in sig):
        return "an efficientnet_pytorch checkpoint (try --model efficientnet_lite0)"
    slots = {int(k.split(".")[1]) for k in sig if k.startswith("mb_module.")}
    if not slots:
        return None
    has_let = any(k.startswith("mb_module.") and k.split(".")[2] == "conv" for k in sig)
    return f"a SCARLET network with {max(slots) + 1}+ slots{' and LET layers (add --let)' if has_let else ''}"


def tensors_sha256(state_dict: dict) -> str:
    """Seeded weights have no file to hash: hash the tensors themselves (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\n".encode())
        h.update(t.numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def load_model(name: str, let: bool = False, checkpoint: str | os.PathLike | None = None, seed: int = 0) -> LoadedModel:
    spec = get_spec(name)
    model = spec.create(let)
    if checkpoint is None and spec.default_checkpoint is not None:
        checkpoint = spec.default_checkpoint()
        source = f"{checkpoint} (shipped by a package)"
    else:
        source = str(checkpoint)
    if checkpoint is None:
        from scarlet_deploy.export.weights import SYNTHETIC_IMAGES, realistic_weights_, sample_images

        # Real photos keep activations O(1) on real data; synthetic ones where none are at hand.
        images, origin = sample_images(SYNTHETIC_IMAGES, spec.preprocess, seed)
        realistic_weights_(model, torch.from_numpy(images), seed=seed)
        # A fingerprint, not just "seeded": the BN statistics depend on which images were at hand, so two
        # machines (or checkouts) can seed different weights, and an export must be refused against the other.
        return LoadedModel(model.eval(), name, let, False, f"seeded:{tensors_sha256(model.state_dict())}",
                           f"{SEEDED} (seed {seed}, BN statistics from {origin})")
    sd = read_state_dict(checkpoint)
    want = _signature(name, let)
    got = _shapes(sd)
    if want != got:
        raise ScarletError(_mismatch_message(str(checkpoint), name, let, sd))
    model.load_state_dict(sd, strict=False)  # strictness checked above, num_batches_tracked optional
    return LoadedModel(model.eval(), name, let, True, sha256_file(checkpoint), source)
