"""Quantization algorithms as pure tensor functions (one per file).

``rtn`` holds the single rounding primitive that every other method reuses.
"""
