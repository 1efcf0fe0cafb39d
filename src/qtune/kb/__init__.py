"""FAQ knowledge base: a Milvus collection of (question, answer) entries and a matcher over it.

    >>> from qtune.kb import FaqMatcher, KnowledgeBase, build_kb
    >>> kb = build_kb(embedder, "faq.csv", "kb.db", model_name="BAAI/bge-small-zh-v1.5")
    >>> FaqMatcher(embedder, kb).match("How do I reset my password?")

Nothing heavy is imported here; pymilvus loads when a knowledge base is opened.
"""

from qtune.kb.faq import (
           FaqEntry,
           FaqMatcher,
           add_entries,
           build_kb,
           delete_entries,
           read_faq,
)
from qtune.kb.store import Hit, KnowledgeBase

__all__ = ["FaqEntry", "FaqMatcher", "Hit", "KnowledgeBase", "add_entries", "build_kb", "delete_entries",
           "read_faq"]
