"""Matplotlib without a display, and PNGs written atomically."""

from __future__ import annotations

import os


def pyplot():
    """matplotlib.pyplot on the Agg backend (no screen needed); imported only when a plot is made."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: str | os.PathLike, dpi: int = 120, metadata: dict[str, str] | None = None) -> None:
    """`metadata`: PNG text chunks ("Software", "Title", ...), which let a later run recognise the file."""
    from qtune.io import atomic_path

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, metadata=metadata)
    pyplot().close(fig)


def png_text(path: str | os.PathLike) -> dict[str, str]:
    """The text chunks of a PNG file; {} for a file that is not a readable PNG."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return dict(getattr(image, "text", {}) or {})
    except (OSError, UnidentifiedImageError, ValueError):
        return {}
