"""Matplotlib without a display, and PNGs written atomically."""

from __future__ import annotations

import os


def pyplot():
    """matplotlib.pyplot on the Agg backend (no screen needed); imported only when a plot is made."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: str | os.PathLike, dpi: int = 120) -> None:
    from qtune.io import atomic_path

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    pyplot().close(fig)
