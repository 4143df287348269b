"""The results store (``results/<run_id>/rows.jsonl`` + ``env.json``), its rows and the
cells they measure."""
from attnbench.results.cell import (MEASURE_KEYS, METRICS, MODES, PRECISIONS,  # noqa: F401
                                    ROW_SETTING_COLUMNS, SETTING_DEFAULTS, STATIC_METRICS,
                                    Cell, amp_precision, canonical_options, cell_id)
from attnbench.results.rows import (RESOLUTION_SWEEP, base_row, canonical_json,  # noqa: F401
                                    error_text, failed_rows, is_oom, ok_row, short_hash)
from attnbench.results.store import *  # noqa: F401,F403
from attnbench.results.store import __all__ as _store_all

__all__ = list(_store_all) + ["RESOLUTION_SWEEP", "base_row", "canonical_json", "error_text",
                              "failed_rows", "is_oom", "ok_row", "short_hash",
                              "Cell", "cell_id", "canonical_options", "MEASURE_KEYS",
                              "METRICS", "MODES", "STATIC_METRICS", "ROW_SETTING_COLUMNS",
                              "SETTING_DEFAULTS", "PRECISIONS", "amp_precision"]
