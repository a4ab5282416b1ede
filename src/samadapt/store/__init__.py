"""Content-addressed embedding store: compute a frozen encoder's output once, reuse it everywhere.

`open_store(DIR)` gives random access by key or dataset id; `embed_dataset(dataset, encoder, DIR)` fills it
(resumable, multi-process and torchrun safe) and returns memory-mapped arrays in dataset order. New entries are
float16 by default (`store_dtype=`); reads are float32.
"""

from samadapt.store.embed import embed_dataset
from samadapt.store.keys import config_digest, entry_key, image_digest
from samadapt.store.shards import DEFAULT_STORE_DTYPE, STORE_DTYPES
from samadapt.store.store import EmbeddingStore, StoreView, open_store
from samadapt.store.table import EmbeddingArray, EmbeddingTable

__all__ = [
    "DEFAULT_STORE_DTYPE",
    "STORE_DTYPES",
    "EmbeddingArray",
    "EmbeddingStore",
    "EmbeddingTable",
    "StoreView",
    "config_digest",
    "embed_dataset",
    "entry_key",
    "image_digest",
    "open_store",
]
