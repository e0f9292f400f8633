"""Loading OpenAI CLIP weights from a local file, never from the network.

Accepted files:

* OpenAI's released ``.pt`` files (``RN50.pt``, ``ViT-B-32.pt`` ...): TorchScript archives;
* plain state-dict files written with ``torch.save`` (optionally wrapped as
  ``{"state_dict": ...}`` or ``{"model": ...}``), fp16 or fp32;
* ``embedded``: the project's small CLIP shipped at ``gridclip/assets/world_clip.pt``.

Models are built with ``clip.model.build_model`` (OpenAI's architecture inference) and returned
in float32, eval mode. Every failure raises :class:`CLIPWeightsError` naming the file and what to
do about it.
"""

from __future__ import annotations

import copy
import logging
import os
import pickle
import pickletools
import threading
import warnings
import zipfile
from typing import Dict, List, Optional, Tuple

import torch

from ..utils.fingerprint import file_content_key

logger = logging.getLogger(__name__)

__all__ = [
    "CLIPWeightsError",
    "EMBEDDED_CLIP_PATH",
    "OPENAI_CLIP_FILES",
    "clip_model_key",
    "clip_embed_dim",
    "clear_clip_memo",
    "load_clip",
    "load_clip_from_cfg",
    "load_clip_state_dict",
    "resolve_clip_weights",
]

#: The project's small CLIP (written by ``tools/train_small_clip.py``).
EMBEDDED_CLIP_PATH = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "world_clip.pt"
)

#: File names OpenAI's ``clip`` package uses in its download cache, by model name.
OPENAI_CLIP_FILES: Dict[str, str] = {
    "RN50": "RN50.pt",
    "RN101": "RN101.pt",
    "RN50x4": "RN50x4.pt",
    "RN50x16": "RN50x16.pt",
    "RN50x64": "RN50x64.pt",
    "ViT-B/32": "ViT-B-32.pt",
    "ViT-B/16": "ViT-B-16.pt",
    "ViT-L/14": "ViT-L-14.pt",
    "ViT-L/14@336px": "ViT-L-14-336px.pt",
}

# Keys every OpenAI CLIP state dict has (text tower + joint space); vision keys checked apart.
_REQUIRED_KEYS = (
    "text_projection",
    "positional_embedding",
    "token_embedding.weight",
    "ln_final.weight",
)
_RESNET_KEYS = ("visual.layer1.0.conv1.weight", "visual.attnpool.positional_embedding")
_VIT_KEYS = ("visual.proj", "visual.conv1.weight", "visual.positional_embedding")
# Non-tensor entries of OpenAI's TorchScript state dicts, dropped by build_model as well.
_META_KEYS = ("input_resolution", "context_length", "vocab_size")

_HOW_TO_GET = (
    "Download OpenAI's weights elsewhere (e.g. RN50.pt from the `clip` package's model list) and "
    "pass the file with MODEL.CLIP.WEIGHTS /path/to/RN50.pt (or put it in MODEL.CLIP.CACHE_DIR), "
    "or use the project's small CLIP with MODEL.CLIP.NAME embedded."
)


_MEMO_LOCK = threading.Lock()  # guards the memos of loaded models and of content keys


class CLIPWeightsError(RuntimeError):
    """CLIP weights are missing, unreadable or of an unexpected architecture."""


def _is_embedded(value: str) -> bool:
    return str(value).strip().lower() == "embedded"


def _cache_file_name(name: str) -> str:
    return OPENAI_CLIP_FILES.get(name, name.replace("/", "-").replace("@", "-") + ".pt")


def resolve_clip_weights(
    weights: str = "", name: str = "RN50", cache_dir: str = "~/.cache/clip"
) -> str:
    """Return the path of the CLIP weights file to load.

    ``weights`` (a path, or ``"embedded"``) wins; empty ``weights`` looks up ``name`` in
    ``cache_dir`` under OpenAI's file names (``RN50.pt``, ``ViT-B-32.pt`` ...);
    ``name == "embedded"`` is the project's shipped small CLIP.

    Raises:
        CLIPWeightsError: listing where it looked and how to obtain the file.
    """
    weights = (weights or "").strip()
    if _is_embedded(weights) or (not weights and _is_embedded(name)):
        if os.path.isfile(EMBEDDED_CLIP_PATH):
            return EMBEDDED_CLIP_PATH
        raise CLIPWeightsError(
            f"The project's small CLIP ({EMBEDDED_CLIP_PATH}) does not exist. Build it with "
            f"`python tools/train_small_clip.py` (reproducible, a few minutes on CPU), or pass "
            f"other weights with MODEL.CLIP.WEIGHTS."
        )
    if weights:
        path = os.path.abspath(os.path.expanduser(weights))
        if os.path.isfile(path):
            return path
        raise CLIPWeightsError(
            f"CLIP weights file {path} (MODEL.CLIP.WEIGHTS={weights!r}) does not exist. "
            + _HOW_TO_GET
        )
    if not name:
        raise CLIPWeightsError(
            "Neither MODEL.CLIP.WEIGHTS nor MODEL.CLIP.NAME is set. " + _HOW_TO_GET
        )
    looked: List[str] = []
    for directory in [cache_dir] if cache_dir else []:
        candidate = os.path.abspath(
            os.path.join(os.path.expanduser(directory), _cache_file_name(name))
        )
        looked.append(candidate)
        if os.path.isfile(candidate):
            return candidate
    raise CLIPWeightsError(
        f"No weights for CLIP {name!r} (MODEL.CLIP.NAME): looked for {looked} "
        f"(MODEL.CLIP.CACHE_DIR={cache_dir!r}); this project never downloads. " + _HOW_TO_GET
    )


def clip_model_key(weights_path: str) -> str:
    """Content key of a weights file (16 hex digits of the sha256 of its bytes), for cache
    keys and cache provenance (:func:`gridclip.utils.fingerprint.file_content_key`).

    The whole file is hashed (about 1 s per GB), once per process per (path, size, mtime): two
    files with the same bytes share a key wherever they live, and any change of a weight changes
    it.
    """
    return file_content_key(weights_path)


def _is_torchscript_archive(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def _unwrap_state_dict(obj, path: str) -> Dict[str, torch.Tensor]:
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict):
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not obj:
        raise CLIPWeightsError(
            f"{path} holds a {type(obj).__name__}, not a CLIP state dict (a dict of tensors, "
            f"optionally under 'state_dict' or 'model'). " + _HOW_TO_GET
        )
    if all(isinstance(k, str) and k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}  # saved from DistributedDataParallel
    return obj


def _pickled_classes(path: str) -> List[str]:
    """The Python classes/functions a ``torch.save`` file would import to be unpickled (read
    without running any of them); empty when it holds only tensors and containers, or when it
    cannot be read that way."""
    try:
        classes = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # not a torch zip file, truncated...: the caller's message applies
        return []
    try:  # the pickle's first class is the saved object's own (GLOBAL comes before NEWOBJ)
        with zipfile.ZipFile(path) as zf:
            data = zf.read(next(n for n in zf.namelist() if n.endswith("data.pkl")))
        first = next(
            str(arg).replace(" ", ".")
            for op, arg, _ in pickletools.genops(data)
            if op.name == "GLOBAL"
        )
    except Exception:
        return classes
    return [first] + [c for c in classes if c != first] if first in classes else classes


def _pickled_object_error(path: str, classes: List[str]) -> CLIPWeightsError:
    modules = [c for c in classes if ".nn.modules." in c or c.startswith("clip.model.")]
    what = (
        f"a pickled model (torch.save(model); classes {modules[:4]})"
        if modules
        else f"pickled Python objects ({classes[:4]})"
    )
    return CLIPWeightsError(
        f"{path} holds {what}, not a state dict of tensors. Unpickling runs code, so this project "
        "does not load such files. Save the weights instead with "
        "torch.save(model.state_dict(), 'clip_weights.pt') (OpenAI's own .pt files work as they "
        "are) and pass that file. " + _HOW_TO_GET
    )


def load_clip_state_dict(path: str) -> Dict[str, torch.Tensor]:
    """Read a CLIP state dict (float32 tensors) from an OpenAI TorchScript or plain file.

    A pickled module (``torch.save(model)``) or other pickled objects are refused with their own
    message (what the file holds, what to give instead): they are never unpickled."""
    try:
        if _is_torchscript_archive(path):
            with warnings.catch_warnings():
                # OpenAI's files are TorchScript: jit.load is the only reader (deprecation noise).
                warnings.simplefilter("ignore", FutureWarning)
                obj = torch.jit.load(path, map_location="cpu").state_dict()
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except CLIPWeightsError:
        raise
    except Exception as e:  # zip / pickle / TorchScript errors of many kinds
        classes = _pickled_classes(path) if isinstance(e, pickle.UnpicklingError) else []
        if classes:
            raise _pickled_object_error(path, classes) from e
        raise CLIPWeightsError(
            f"Could not read CLIP weights {path} ({type(e).__name__}: {str(e)[:300]}). The file "
            f"is truncated or corrupt, or not a PyTorch file: download it again. " + _HOW_TO_GET
        ) from e
    state_dict = _unwrap_state_dict(obj, path)
    out = {}
    for k, v in state_dict.items():
        if k in _META_KEYS:
            continue
        if not isinstance(v, torch.Tensor):
            raise CLIPWeightsError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
        out[k] = v.float() if v.is_floating_point() else v
    return out


def _check_architecture(state_dict: Dict[str, torch.Tensor], path: str) -> None:
    missing = [k for k in _REQUIRED_KEYS if k not in state_dict]
    is_vit = "visual.proj" in state_dict
    missing += [k for k in (_VIT_KEYS if is_vit else _RESNET_KEYS) if k not in state_dict]
    if missing:
        sample = sorted(state_dict)[:5]
        raise CLIPWeightsError(
            f"{path} is not an OpenAI CLIP state dict: missing {missing} (its first keys are "
            f"{sample}). Unknown or mismatched architecture. " + _HOW_TO_GET
        )


def clip_embed_dim(clip_model) -> int:
    """Dimension D of a CLIP model's joint image-text space."""
    return int(clip_model.text_projection.shape[1])


def load_clip(
    weights: str = "",
    name: str = "RN50",
    cache_dir: str = "~/.cache/clip",
    device="cpu",
    expected_embed_dim: Optional[int] = None,
):
    """Build an OpenAI ``clip.model.CLIP`` from a local file (float32, eval mode).

    Args:
        weights: a file path, ``"embedded"``, or empty to look ``name`` up in ``cache_dir``.
        name: OpenAI model name (``RN50``, ``ViT-B/32`` ...) or ``embedded``.
        cache_dir: OpenAI's download cache, searched when ``weights`` is empty.
        device: where to put the model.
        expected_embed_dim: if given, the joint-space dimension the caller expects
            (MODEL.CLIP.EMBED_DIM); a mismatch raises.

    Raises:
        CLIPWeightsError: missing, truncated/corrupt file, unknown architecture, or dimension
            mismatch; the message names the file.
    """
    from clip.model import build_model

    path = resolve_clip_weights(weights, name, cache_dir)
    state_dict = load_clip_state_dict(path)
    _check_architecture(state_dict, path)
    try:
        # build_model casts to fp16 before loading; reload in fp32 so fp32 weights stay exact.
        model = build_model(dict(state_dict)).float()
        model.load_state_dict(state_dict)
    except (KeyError, RuntimeError, AssertionError, ValueError, IndexError) as e:
        raise CLIPWeightsError(
            f"{path}: the state dict does not fit OpenAI's CLIP architecture "
            f"({type(e).__name__}: {str(e)[:400]}). " + _HOW_TO_GET
        ) from e
    dim = clip_embed_dim(model)
    if expected_embed_dim is not None and dim != int(expected_embed_dim):
        raise CLIPWeightsError(
            f"{path}: this CLIP's embedding dimension is {dim}, but {int(expected_embed_dim)} is "
            f"expected (MODEL.CLIP.EMBED_DIM). Set MODEL.CLIP.EMBED_DIM {dim} or use the weights "
            f"the config was written for (RN50: 1024, ViT-B/32: 512)."
        )
    logger.info(
        "Loaded CLIP from %s: %s visual, input %d px, embedding dim %d, text context %d",
        path,
        type(model.visual).__name__,
        model.visual.input_resolution,
        dim,
        model.context_length,
    )
    return model.to(device).eval()


_MEMO: Dict[Tuple, object] = {}


def load_clip_from_cfg(cfg, copy_model: bool = True):
    """Load the CLIP of ``cfg.MODEL.CLIP`` (WEIGHTS, NAME, CACHE_DIR, EMBED_DIM), on CPU.

    Memoised per process by (resolved path, mtime, size): two models built in one process read
    the file once. With ``copy_model`` (default) each caller gets its own deep copy, so freezing,
    moving or fine-tuning it cannot affect another user; ``copy_model=False`` returns the shared
    instance for read-only use (it must not be modified or moved).
    """
    c = cfg.MODEL.CLIP
    path = resolve_clip_weights(c.WEIGHTS, c.NAME, c.CACHE_DIR)
    st = os.stat(path)
    key = (path, st.st_mtime_ns, st.st_size)
    with _MEMO_LOCK:
        model = _MEMO.get(key)
        if model is None:
            model = load_clip(path, expected_embed_dim=c.EMBED_DIM)
            for stale in [k for k in _MEMO if k[0] == path]:
                del _MEMO[stale]
            _MEMO[key] = model
    if clip_embed_dim(model) != int(c.EMBED_DIM):  # memoised under another EMBED_DIM
        raise CLIPWeightsError(
            f"{path}: this CLIP's embedding dimension is {clip_embed_dim(model)}, but "
            f"MODEL.CLIP.EMBED_DIM is {c.EMBED_DIM}."
        )
    return copy.deepcopy(model) if copy_model else model


def clear_clip_memo() -> None:
    """Forget memoised CLIP models (tests, or to free memory)."""
    with _MEMO_LOCK:
        _MEMO.clear()
