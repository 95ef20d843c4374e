"""The PyTorch backend: SigLIP, projector, Gemma 1/2 and KV cache in PyTorch (imported only when chosen)."""
