"""Repository conftest. The llmlab plugin itself is loaded from the installed package (pytest11 entry point),
so `pytest bench` works the same from any checkout; the project's own tests drive it with pytester."""

pytest_plugins = ["pytester"]
