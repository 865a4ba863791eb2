"""`python -m kimi_jax.serve`: the OpenAI- and Anthropic-compatible HTTP server."""

import sys

from kimi_jax.serve.app import main

sys.exit(main())
