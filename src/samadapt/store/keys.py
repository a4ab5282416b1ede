"""Content addresses: what makes two embeddings the same entry.

An entry is (image content, encoder settings, output name). The image part hashes the decoded pixels with
their shape and dtype, so a renamed file is a hit and a re-encoded or edited file is a miss. The settings
part hashes `Encoder.cache_key_fields()` (name, checkpoint sha256, preprocessing, image size, precision,
implementation version), so a changed checkpoint or setting can never return stale vectors. The output name
("neck", or one intermediate layer) is the third part, so asking for more layers later reuses the neck.

The stored dtype is part of the settings: `store_fields` adds `"store_dtype"` to the hashed fields for float16
and bfloat16, and leaves float32 fields as they were, so float32 entries keep the keys of stores written
before store dtypes existed. A request for float32 therefore only ever finds float32 data; a request for a
lighter dtype also accepts float32 entries (more exact than asked), see `readable_configs`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

# Bump when the meaning of a key changes; old entries then simply stop matching.
KEY_VERSION = "samadapt-store-1"


def image_digest(image: np.ndarray) -> str:
    """sha256 of the decoded image: dtype, shape and C-ordered pixel bytes."""
    array = np.ascontiguousarray(image)
    digest = hashlib.sha256(f"{array.dtype.str}|{array.shape}|".encode())
    digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def fields_of(encoder_or_fields: Any) -> dict[str, Any]:
    """Accept an `Encoder` (anything with `cache_key_fields()`) or the fields dict itself."""
    if hasattr(encoder_or_fields, "cache_key_fields"):
        return dict(encoder_or_fields.cache_key_fields())
    if isinstance(encoder_or_fields, Mapping):
        return dict(encoder_or_fields)
    raise TypeError(
        f"expected an Encoder or a mapping of cache-key fields, got {type(encoder_or_fields).__name__}"
    )


def store_fields(fields: Mapping[str, Any], store_dtype: str) -> dict[str, Any]:
    """The fields that identify entries of `fields`' encoder stored as `store_dtype`."""
    out = {k: v for k, v in fields.items() if k != "store_dtype"}
    if store_dtype != "float32":
        out["store_dtype"] = store_dtype
    return out


def readable_configs(fields: Mapping[str, Any], store_dtype: str) -> list[tuple[str, dict[str, Any]]]:
    """(config digest, fields) of the entries that may answer a request for `store_dtype`, preferred first:
    the requested dtype, then float32 (never a lighter dtype for a float32 request)."""
    dtypes = [store_dtype] if store_dtype == "float32" else [store_dtype, "float32"]
    return [(config_digest(f), f) for f in (store_fields(fields, d) for d in dtypes)]


def canonical_fields(fields: Mapping[str, Any]) -> str:
    """The JSON text that is hashed (sorted keys, no spaces), also stored in the manifest for humans."""
    return json.dumps(dict(fields), sort_keys=True, separators=(",", ":"), default=str)


def config_digest(fields: Mapping[str, Any]) -> str:
    return hashlib.sha256(f"{KEY_VERSION}|{canonical_fields(fields)}".encode()).hexdigest()


def entry_key(image: str, config: str, output: str) -> str:
    """Key of one entry from the image digest, the config digest and the output name."""
    return hashlib.sha256(f"{image}|{config}|{output}".encode()).hexdigest()


def output_names(layers: Iterable[int | str] | None) -> list[str]:
    """Names of the tensors `Encoder.embed(..., layers=layers)` returns: "neck" first, then each layer."""
    names = ["neck"]
    for layer in layers or ():
        name = str(layer)
        if name not in names:
            names.append(name)
    return names
