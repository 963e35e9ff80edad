"""The simulated card's private parts: the tensor tracker, the caching-allocator model, CUDA's autocast policy."""
