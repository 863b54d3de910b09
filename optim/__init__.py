"""Sharpness-aware and auto-switching optimizers (imports only torch)."""
