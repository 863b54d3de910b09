"""Reproductions of each paper's diagnostic claims on MNIST-1D (``python -m figures``)."""
