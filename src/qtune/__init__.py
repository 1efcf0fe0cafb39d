"""qtune: adapt small open models to your own text, evaluate them honestly, serve them.

Importing the package is cheap; torch and transformers load only when a model is used.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "evaluate", "load", "predict", "train"]


def __getattr__(name):
    # The public API lives in qtune.api; import it lazily so `import qtune` stays light.
    if name in {"load", "train", "evaluate", "predict"}:
        from qtune import api

        return getattr(api, name)
    raise AttributeError(f"module 'qtune' has no attribute {name!r}")
