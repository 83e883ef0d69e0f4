"""The inference cache: content-addressed, row by row, with an optional Redis tier.

Each version has its own in-process cache (`version`); with `TORCHGATE_REDIS_URL` a
shared Redis tier (`shared`) sits behind it. Rows are keyed by SHA-256 (`keys`) and
stored in Redis as compact binary (`codec`); the client's `Cache-Control` says what may
be read and written (`control`); `InferenceCache` (`inference`) holds them all.
"""

from torchgate.serving.cache.codec import Row, decode_row, encode_row
from torchgate.serving.cache.control import CachePolicy
from torchgate.serving.cache.inference import InferenceCache
from torchgate.serving.cache.keys import key_prefix, row_keys
from torchgate.serving.cache.shared import SHARED_RETRY_S, SharedTier
from torchgate.serving.cache.version import VersionCache

__all__ = [
    "SHARED_RETRY_S",
    "CachePolicy",
    "InferenceCache",
    "Row",
    "SharedTier",
    "VersionCache",
    "decode_row",
    "encode_row",
    "key_prefix",
    "row_keys",
]
