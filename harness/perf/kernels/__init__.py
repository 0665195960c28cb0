"""Fused decode kernels: lean_decode.py (the graph-decode floor reference), triton_decode.py
(Triton kernels for one decode step)."""
