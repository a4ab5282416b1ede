"""Frozen SAM-family image encoders: registry, preprocessing, safe checkpoint loading."""

from samadapt.encoders.encoder import Encoder, RandomWeightsWarning, list_encoders, load_encoder
from samadapt.encoders.registry import ENCODERS, EncoderSpec, get_spec

__all__ = [
    "ENCODERS",
    "Encoder",
    "EncoderSpec",
    "RandomWeightsWarning",
    "get_spec",
    "list_encoders",
    "load_encoder",
]
