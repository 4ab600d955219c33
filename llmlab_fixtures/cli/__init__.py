"""The ``llmlab`` command and its subcommands."""
