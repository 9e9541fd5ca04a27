"""Where the data comes from: labelled datasets, head-output capture, the on-disk head cache, synthetic tasks.

>>> from data import HeadCache
>>> c = HeadCache.open("runs/cache/minilm-capitals")
>>> c.activations.shape, len(c.labels)
"""

from data.cache import HeadCache, ShardedArray
from data.cache_writer import CacheWriter, write_cache
from data.labels import encode_labels, infer_schema

__all__ = ["CacheWriter", "HeadCache", "ShardedArray", "encode_labels", "infer_schema", "write_cache"]
