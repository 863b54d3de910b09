"""Reproductions of each paper's diagnostic claims on MNIST-1D (``python -m figures``)."""
import landscape  # noqa: E402,F401  (raises a clear ImportError if analysis is shadowed)
