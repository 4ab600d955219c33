"""Models: the registry, model specs, finding and downloading weights, GGUF headers, the cache and resources."""
