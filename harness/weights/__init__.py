"""Bytes of stored weights: footprint.py (what a quantized model stores), packing.py (bit packing)."""
