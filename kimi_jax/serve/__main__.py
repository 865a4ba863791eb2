"""`python -m kimi_jax.serve`: the OpenAI- and Anthropic-compatible HTTP server (kimi_jax/serve/cli.py)."""

import sys

from kimi_jax.serve.cli import main

sys.exit(main())
