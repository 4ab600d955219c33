"""In-process llama.cpp (llama-cpp-python's low-level API): the provider, KV-cache streams and generation."""

from llmlab_fixtures.providers.base import Backend

BACKENDS = (Backend("llama-cpp", "llmlab_fixtures.providers.llama_cpp.provider", rank=10,
                    aliases=("llamacpp", "llama_cpp", "gguf"), in_process=True, loglik=True, package="llama_cpp",
                    registry_key="gguf"),)
