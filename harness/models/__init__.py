"""Models and what they read: zoo.py (loading LLMs: built-in, tiny, local, hub), encoders.py
(sentence encoders), vision.py (the vision model kind), corpora.py (corpora and token windows),
artifacts.py (the quantized-model cache)."""
