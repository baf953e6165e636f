"""Attention backends: the PyTorch reference, and FlashInfer on CUDA."""
