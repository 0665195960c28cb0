"""qharness: which quantization backend and bit-width gives the best quality per byte and per
second on this hardware. Importing the package never imports an optional backend."""

__version__ = "0.1.0"
