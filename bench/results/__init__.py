"""The results store: tidy rows in ``results/<run_id>/rows.jsonl`` plus ``env.json``."""
from attnbench.results.store import *  # noqa: F401,F403
from attnbench.results.store import __all__  # noqa: F401
