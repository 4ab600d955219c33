"""``python -m llmlab_fixtures.cli``: the llmlab command."""

from llmlab_fixtures.cli.main import main

raise SystemExit(main())
