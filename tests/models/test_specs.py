"""Model spec parsing: every syntax the CLI accepts, and the one-line errors for the rest."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmlab_fixtures.errors import ConfigError
from llmlab_fixtures.models.registry import builtin_models, load_models
from llmlab_fixtures.models.specs import parse_spec, parse_specs

MODELS = builtin_models()


@pytest.mark.parametrize(
    ("raw", "backend", "target", "label"),
    [
        ("local:smollm2-135m", "llama-cpp", "smollm2-135m", "llama-cpp:smollm2-135m"),
        ("smollm2-135m", "llama-cpp", "smollm2-135m", "llama-cpp:smollm2-135m"),
        ("llama-cpp:gemma3-270m", "llama-cpp", "gemma3-270m", "llama-cpp:gemma3-270m"),
        ("llama-cpp:/models/x.gguf", "llama-cpp", "/models/x.gguf", "llama-cpp:x.gguf"),
        ("/models/y.gguf", "llama-cpp", "/models/y.gguf", "llama-cpp:y.gguf"),
        ("transformers:HuggingFaceTB/SmolLM2-135M", "transformers", "HuggingFaceTB/SmolLM2-135M",
         "transformers:HuggingFaceTB/SmolLM2-135M"),
        ("hf:pythia-70m", "transformers", "pythia-70m", "transformers:pythia-70m"),
        ("ollama:qwen2.5:0.5b", "ollama", "qwen2.5:0.5b", "ollama:qwen2.5:0.5b"),
        ("gpt-4o-mini", "openai", "gpt-4o-mini", "gpt-4o-mini"),
        ("claude-3-haiku", "anthropic", "claude-3-haiku-20240307", "claude-3-haiku"),
        ("gemini-1.5-flash", "google", "gemini-1.5-flash", "gemini-1.5-flash"),
        ("openai:gpt-4.1-nano", "openai", "gpt-4.1-nano", "gpt-4.1-nano"),
        ("claude-sonnet-4-5", "anthropic", "claude-sonnet-4-5", "claude-sonnet-4-5"),
    ],
)
def test_parse_spec(raw: str, backend: str, target: str, label: str) -> None:
    spec = parse_spec(raw, MODELS)
    assert (spec.backend, spec.target, spec.label) == (backend, target, label)


def test_openai_compatible_endpoint() -> None:
    spec = parse_spec("openai-compat:http://127.0.0.1:8080/v1#smollm2", MODELS)
    assert (spec.backend, spec.base_url, spec.target) == ("openai-compat", "http://127.0.0.1:8080/v1", "smollm2")
    assert spec.is_local
    assert not parse_spec("openai-compat:https://api.example.com/v1#m", MODELS).is_local


def test_use_local_prefers_the_local_form() -> None:
    hosted = parse_spec("gpt-oss-20b", MODELS)  # served both as a GGUF and by an OpenAI-compatible host
    assert (hosted.backend, hosted.target, hosted.api_key_env) == ("openai-compat", "openai/gpt-oss-20b",
                                                                   "GROQ_API_KEY")
    assert hosted.label == "openai-compat:gpt-oss-20b" and not hosted.is_local
    local = parse_spec("gpt-oss-20b", MODELS, use_local=True)
    assert (local.backend, local.label, local.is_local) == ("llama-cpp", "llama-cpp:gpt-oss-20b", True)
    assert parse_spec("qwen-0.5b", MODELS).backend == "llama-cpp"  # no API form: local anyway
    assert parse_spec("gpt-4o-mini", MODELS, use_local=True).backend == "openai"  # has no local form


def test_use_local_on_a_user_model_with_both_forms(tmp_path: Path) -> None:
    (tmp_path / "llmlab.toml").write_text(
        '[models.mine]\ngguf = { path = "/models/mine.gguf" }\n'
        '"openai-compat" = { base_url = "http://127.0.0.1:9000/v1", model = "mine-q4" }\n'
    )
    models = load_models((tmp_path / "llmlab.toml",))
    assert parse_spec("mine", models).label == "openai-compat:mine"
    assert parse_spec("mine", models).base_url == "http://127.0.0.1:9000/v1"
    assert parse_spec("mine", models, use_local=True).label == "llama-cpp:mine"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("smolm2-135m", "unknown model 'smolm2-135m': did you mean smollm2-135m"),
        ("local:qwen-05b", "unknown model 'qwen-05b': did you mean qwen-0.5b"),
        ("local:gpt-4o-mini", "model 'gpt-4o-mini' has no local form"),
        ("openai-compat:http://x/v1", "model spec 'openai-compat:http://x/v1': write openai-compat:<base_url>#<model>"),
    ],
)
def test_bad_specs_say_how_to_fix(raw: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_spec(raw, MODELS)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_parse_specs_keeps_order_and_drops_duplicates() -> None:
    specs = parse_specs("local:gemma3-270m, smollm2-135m,local:smollm2-135m", MODELS)
    assert [s.label for s in specs] == ["llama-cpp:gemma3-270m", "llama-cpp:smollm2-135m"]


def test_user_models_from_llmlab_toml(tmp_path) -> None:
    (tmp_path / "llmlab.toml").write_text(
        '[models.my-model]\nparameters = 1000\ngguf = { path = "/data/my.gguf" }\n', encoding="utf-8"
    )
    models = load_models((tmp_path / "llmlab.toml",))
    spec = parse_spec("local:my-model", models)
    assert (spec.backend, spec.entry.parameters) == ("llama-cpp", 1000)
