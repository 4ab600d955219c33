"""In-process llama.cpp (llama-cpp-python's low-level API): the provider, KV-cache streams and generation."""
