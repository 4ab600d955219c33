"""In-process Hugging Face transformers: the provider, token trees and their attention, GGUF conversion
and generation."""
