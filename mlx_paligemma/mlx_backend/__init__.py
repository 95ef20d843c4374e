"""The MLX backend: SigLIP, projector, Gemma 1/2 and KV cache in MLX (imported only when chosen)."""
