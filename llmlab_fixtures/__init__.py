"""llmlab: a pytest plugin that benchmarks local and cloud language models on TruthfulQA, ARC, GSM8K, MMLU and
HellaSwag, scored like lm-evaluation-harness."""

__version__ = "0.1.0"
