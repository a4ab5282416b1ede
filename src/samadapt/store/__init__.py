"""Content-addressed embedding store: compute a frozen encoder's output once, reuse it everywhere.

`open_store(DIR)` gives random access by key or dataset id; `embed_dataset(dataset, encoder, DIR)` fills it
(resumable, multi-process and torchrun safe) and returns memory-mapped arrays in dataset order.
"""

from samadapt.store.embed import embed_dataset
from samadapt.store.keys import config_digest, entry_key, image_digest
from samadapt.store.store import EmbeddingStore, StoreView, open_store
from samadapt.store.table import EmbeddingArray, EmbeddingTable

__all__ = [
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
