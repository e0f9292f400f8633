"""Layer 0 helpers with no project imports: atomic file writes, the one cache file format and
content keys for provenance."""

from .cache import (
    CACHE_FORMAT_VERSION,
    CacheError,
    CacheMismatchError,
    decode_strings,
    encode_strings,
    load_cache,
    read_cache_header,
    save_cache,
)
from .fingerprint import dataset_fingerprint, file_content_key
from .io import atomic_write

__all__ = [
    "CACHE_FORMAT_VERSION",
    "CacheError",
    "CacheMismatchError",
    "atomic_write",
    "dataset_fingerprint",
    "decode_strings",
    "encode_strings",
    "file_content_key",
    "load_cache",
    "read_cache_header",
    "save_cache",
]
