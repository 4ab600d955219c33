"""In-process Hugging Face transformers: the provider, where models come from (locate), log-likelihood scoring
(token trees and their attention), generation and GGUF conversion."""

from llmlab_fixtures.providers.base import Backend

BACKENDS = (Backend("transformers", "llmlab_fixtures.providers.transformers.provider", rank=20, aliases=("hf",),
                    in_process=True, loglik=True, package="transformers", registry_key="transformers"),)
