"""Layer 0 helpers with no project imports: atomic file writes and the one cache file format."""

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
from .io import atomic_write

__all__ = [
    "CACHE_FORMAT_VERSION",
    "CacheError",
    "CacheMismatchError",
    "atomic_write",
    "decode_strings",
    "encode_strings",
    "load_cache",
    "read_cache_header",
    "save_cache",
]
