"""Command-line entry points (``console_scripts`` in setup.py; ``examples/`` and ``tools/`` call them):
``rasa-train``, ``rasa-export``, ``rasa-memory``, ``rasa-reconstruction``."""
