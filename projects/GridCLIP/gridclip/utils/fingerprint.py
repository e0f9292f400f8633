"""Content keys for provenance: what a file or a registered dataset holds, not where it lives.

- :func:`file_content_key`: 16 hex digits of the sha256 of a file's bytes, memoised per process
  by (path, size, mtime), so a large file is hashed once.
- :func:`dataset_fingerprint`: a key of a registered Detectron2 dataset. When its metadata names
  a ``json_file`` (every LVIS-format dataset of the project, the embedded world included) it is
  that file's content key (cheap: no parsing, memoised); otherwise the dataset dicts are loaded
  and their ``(image_id, file base name, height, width)`` are hashed, so two datasets that share
  image ids but not images differ.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from typing import Dict, Iterable, Sequence, Tuple, Union

from detectron2.data import DatasetCatalog, MetadataCatalog

__all__ = ["file_content_key", "dataset_fingerprint", "dataset_dicts_fingerprint"]

_LOCK = threading.Lock()
_MEMO: Dict[Tuple[str, int, int], str] = {}


def file_content_key(path: str) -> str:
    """16 hex digits of the sha256 of the file's bytes (about 1 s per GB, once per process)."""
    full = os.path.abspath(os.path.expanduser(path))
    st = os.stat(full)
    memo_key = (full, st.st_size, st.st_mtime_ns)
    with _LOCK:
        key = _MEMO.get(memo_key)
    if key is None:
        h = hashlib.sha256()
        with open(full, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        key = h.hexdigest()[:16]
        with _LOCK:
            _MEMO[memo_key] = key
    return key


def dataset_dicts_fingerprint(dataset_dicts: Iterable[dict]) -> str:
    """16 hex digits over each image's ``(image_id, base name of file_name, height, width)``."""
    h = hashlib.sha256()
    for d in dataset_dicts:
        item = [
            str(d.get("image_id")),
            os.path.basename(str(d.get("file_name", ""))),
            d.get("height"),
            d.get("width"),
        ]
        h.update(json.dumps(item).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()[:16]


def dataset_fingerprint(names: Union[str, Sequence[str]]) -> str:
    """Content key of one registered dataset or of several (in order).

    Raises:
        KeyError: a name that is not registered (Detectron2's message lists the registered ones).
    """
    if isinstance(names, str):
        names = [names]
    keys = []
    for name in names:
        json_file = getattr(MetadataCatalog.get(name), "json_file", None)
        if name not in DatasetCatalog.list():
            DatasetCatalog.get(name)  # raises Detectron2's KeyError naming the known datasets
        if json_file and os.path.isfile(json_file):
            keys.append("json:" + file_content_key(json_file))
        else:
            keys.append("images:" + dataset_dicts_fingerprint(DatasetCatalog.get(name)))
    if len(keys) == 1:
        return keys[0]
    return "multi:" + hashlib.sha256("\n".join(keys).encode("utf-8")).hexdigest()[:16]
