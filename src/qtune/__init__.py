"""qtune: adapt small open models to your own text, evaluate them honestly, serve them.

Importing the package is cheap; torch and transformers load only when a model is used.
"""

import os

# OpenMP threads that wait for work by spinning (libgomp's default) steal the cores they share with
# any other busy process: beside two CPU-bound processes on 2 cores a training step ran 3.1x slower
# than quiet with spinning threads and 1.4x slower with sleeping ones (`python -m bench shared_cpu`
# times such work quiet and loaded for qtune and sentence-transformers). Threads that sleep at once
# pay a wake-up for every operation, though, which small calls (one short text: a served request)
# feel most. A short bounded spin first (GOMP_SPINCOUNT: libgomp's busy-wait iterations before it
# sleeps; 10,000 is about 0.1 ms) keeps both: MiniLM embedding one short text per call ran 75
# calls/s quiet with PASSIVE alone, 113 with ACTIVE and 117 with PASSIVE + 10,000, and beside two
# busy processes 41, 8 and 34 calls/s, batches and training steps as with PASSIVE alone (2 cores,
# medians of alternating runs, which varied by about 15%). Both are read when torch loads its
# OpenMP runtime, so they are set here, before any qtune module imports torch; a value the user
# set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

__version__ = "0.1.0"

__all__ = ["__version__", "evaluate", "load", "predict", "train"]


def __getattr__(name):
    # The public API lives in qtune.api; import it lazily so `import qtune` stays light.
    if name in {"load", "train", "evaluate", "predict"}:
        from qtune import api

        return getattr(api, name)
    raise AttributeError(f"module 'qtune' has no attribute {name!r}")
