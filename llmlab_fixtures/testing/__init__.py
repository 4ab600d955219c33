"""Loopback stand-ins for model servers (Ollama, Anthropic, Google) backed by real local models.

They let llmlab's own tests, and users without network access, exercise the HTTP backends with the official
client libraries unmodified. Every server listens on 127.0.0.1 only.
"""
