"""The one cache file format: a safetensors file whose header says what it holds and whence.

Every cache the project writes (text embeddings, the GridCLIP teacher, the ViLD teacher's meta
and per-image entries) is a `safetensors <https://huggingface.co/docs/safetensors>`_ file: the
tensors, plus a string metadata header with

- ``format``: ``"gridclip-cache"`` (tells our files from other safetensors files),
- ``format_version``: :data:`CACHE_FORMAT_VERSION` (bumped when a layout changes),
- ``kind``: what the cache is (``"text_embeddings"``, ``"gridclip_teacher"``, ...),
- ``provenance``: a JSON object of what the cache was computed from (the CLIP weights' content
  key, the dataset, the settings that change its values).

:func:`load_cache` refuses a file of another kind or version, and, given the provenance the
caller is about to rely on, any entry that differs, with a :class:`CacheMismatchError` naming the
file, the key and both values. Loading never unpickles anything.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes

from .io import atomic_write

__all__ = [
    "CACHE_FORMAT",
    "CACHE_FORMAT_VERSION",
    "CacheError",
    "CacheMismatchError",
    "save_cache",
    "load_cache",
    "read_cache_header",
    "encode_strings",
    "decode_strings",
]

CACHE_FORMAT = "gridclip-cache"
CACHE_FORMAT_VERSION = 1


class CacheError(ValueError):
    """A cache file that is missing, unreadable, truncated or not in the project's format."""


class CacheMismatchError(CacheError):
    """A cache of another kind, format version or provenance than the caller needs.

    Attributes:
        path, key: the file and the header entry that differ.
        cached, expected: the value in the file and the value the caller needs.
    """

    def __init__(self, path: str, key: str, cached: Any, expected: Any, hint: str = ""):
        self.path, self.key, self.cached, self.expected = path, key, cached, expected
        super().__init__(
            f"cache {path}: {key} is {_show(cached)} in the file but {_show(expected)} is "
            f"expected" + (f". {hint}" if hint else "")
        )


def _show(value: Any) -> str:
    return "(absent)" if value is _ABSENT else json.dumps(value, sort_keys=True)


_ABSENT = object()


def _canonical(value: Any) -> Any:
    """The JSON round trip of ``value`` (tuples become lists, keys strings): what a file holds."""
    return json.loads(json.dumps(value, sort_keys=True))


def save_cache(
    path: str, tensors: Mapping[str, torch.Tensor], kind: str, provenance: Mapping[str, Any]
) -> str:
    """Write ``tensors`` and the header atomically to ``path``; returns the absolute path.

    Args:
        tensors: name -> tensor (made contiguous and moved to the CPU); may be empty.
        kind: what the cache is, checked by :func:`load_cache`.
        provenance: JSON-serialisable dict of what the values were computed from.
    """
    header = {
        "format": CACHE_FORMAT,
        "format_version": str(CACHE_FORMAT_VERSION),
        "kind": str(kind),
        "provenance": json.dumps(_canonical(dict(provenance)), sort_keys=True),
    }
    data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    payload = safetensors_bytes(data, metadata=header)
    with atomic_write(path, "wb") as f:
        f.write(payload)
    return os.path.abspath(os.path.expanduser(path))


def _read(path: str, kind: str, hint: str, with_tensors: bool):
    """(absolute path, provenance, tensors or None) of a checked cache file."""
    full = os.path.abspath(os.path.expanduser(path))
    suffix = f". {hint}" if hint else ""
    if not os.path.isfile(full):
        raise CacheError(f"cache {full} does not exist{suffix}")
    try:
        with safe_open(full, framework="pt", device="cpu") as handle:
            header = handle.metadata() or {}
            _check_header(full, header, kind, hint)
            tensors = (
                {name: handle.get_tensor(name) for name in handle.keys()} if with_tensors else None
            )
    except CacheError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CacheError(
            f"cache {full} is truncated, corrupt or not in the project's cache format "
            f"(safetensors with a gridclip-cache header; caches written before that format are "
            f"torch/numpy files and must be rebuilt): {e}{suffix}"
        ) from e
    try:
        provenance = json.loads(header.get("provenance", "{}"))
    except json.JSONDecodeError as e:
        raise CacheError(f"cache {full}: its provenance header is not JSON ({e}){suffix}") from e
    return full, provenance, tensors


def _check_header(full: str, header: Mapping[str, str], kind: str, hint: str) -> None:
    expected = {"format": CACHE_FORMAT, "format_version": str(CACHE_FORMAT_VERSION), "kind": kind}
    for key, value in expected.items():
        if header.get(key) != value:
            raise CacheMismatchError(full, key, header.get(key, _ABSENT), value, hint)


def read_cache_header(path: str, kind: str, hint: str = "") -> Dict[str, Any]:
    """The provenance of a cache file, checked for format, version and ``kind``; reads no
    tensor."""
    return _read(path, kind, hint, with_tensors=False)[1]


def load_cache(
    path: str,
    kind: str,
    expected_provenance: Optional[Mapping[str, Any]] = None,
    hint: str = "",
) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """Read a cache written by :func:`save_cache`.

    Args:
        kind: the kind the caller needs.
        expected_provenance: entries the file's provenance must hold with equal values (compared
            after a JSON round trip); keys not given are not checked.
        hint: appended to every error (e.g. which tool rebuilds the cache).

    Returns:
        (tensors, provenance): name -> CPU tensor, and the file's whole provenance dict.

    Raises:
        CacheError: missing, truncated or foreign file.
        CacheMismatchError: other format version, kind, or a provenance entry that differs.
    """
    full, provenance, tensors = _read(path, kind, hint, with_tensors=True)
    for key, value in (expected_provenance or {}).items():
        cached = provenance.get(key, _ABSENT)
        if cached is _ABSENT or cached != _canonical(value):
            raise CacheMismatchError(full, f"provenance[{key!r}]", cached, _canonical(value), hint)
    return tensors, provenance


def encode_strings(strings: Sequence[str]) -> torch.Tensor:
    """A list of strings as a uint8 tensor (UTF-8 JSON), for string tables inside a cache."""
    data = json.dumps([str(s) for s in strings], ensure_ascii=False).encode("utf-8")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()


def decode_strings(tensor: torch.Tensor) -> list:
    """Inverse of :func:`encode_strings`."""
    return json.loads(bytes(tensor.to(torch.uint8).tolist()).decode("utf-8"))
