"""Plain helpers and constants for the tests (the fixtures and hooks are in tests/conftest.py).

`tests/` is on sys.path (pytest puts the rootdir conftest's folder there), so tests write
`from support import run, ANIMALS`. tests/conftest.py registers this package for pytest's assertion
rewriting, so a failed `assert` in a helper reports its values as one in a test does.
"""

from support.cli import (MISSING_MODEL, assert_data_accepted_up_to_the_model, assert_refused_before_the_model_loads,
                         assert_user_error, run)
from support.data import (ANIMALS, BOM, FAQ_QUESTIONS, FILLER, SPECIALS, VEHICLES, assert_located, data_error, jsonl,
                          read_jsonl, synthetic_pairs, write, write_lines, write_pairs_csv, write_query_groups)
from support.models import qwen_tokenizer_dir, save_tiny_qwen, train_losses
from support.serving import assert_api_error, free_port

__all__ = [
    "ANIMALS", "BOM", "FAQ_QUESTIONS", "FILLER", "MISSING_MODEL", "SPECIALS", "VEHICLES",
    "assert_api_error", "assert_data_accepted_up_to_the_model", "assert_located",
    "assert_refused_before_the_model_loads", "assert_user_error", "data_error", "free_port", "jsonl",
    "qwen_tokenizer_dir", "read_jsonl", "run", "save_tiny_qwen", "synthetic_pairs", "train_losses", "write",
    "write_lines", "write_pairs_csv", "write_query_groups",
]
