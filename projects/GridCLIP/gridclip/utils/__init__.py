"""Layer 0 helpers with no project imports: atomic file writes, the one cache file format,
content keys for provenance, checks of numeric settings, and whether a graph is being
exported."""

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
from .checks import check_whole_number
from .fingerprint import dataset_fingerprint, file_content_key
from .io import atomic_write
from .tracing import is_exporting

__all__ = [
    "CACHE_FORMAT_VERSION",
    "CacheError",
    "CacheMismatchError",
    "atomic_write",
    "check_whole_number",
    "dataset_fingerprint",
    "decode_strings",
    "encode_strings",
    "file_content_key",
    "is_exporting",
    "load_cache",
    "read_cache_header",
    "save_cache",
]
