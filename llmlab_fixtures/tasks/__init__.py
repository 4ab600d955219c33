"""Benchmark task definitions (YAML data) and their registry."""

from llmlab_fixtures.tasks.definitions import (
    ExactMatchSpec,
    FilterSpec,
    GenerateScoringSpec,
    GenerationSpec,
    MetricSpec,
    TaskDefinition,
    get_task,
    list_tasks,
    load_task_file,
)

__all__ = [
    "ExactMatchSpec",
    "FilterSpec",
    "GenerateScoringSpec",
    "GenerationSpec",
    "MetricSpec",
    "TaskDefinition",
    "get_task",
    "list_tasks",
    "load_task_file",
]
