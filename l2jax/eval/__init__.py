"""Evaluation: reward-model accuracy (Tables 7, 8), win rates, reward shift, diversity, tension, consistency."""
from __future__ import annotations

from pathlib import Path


def save_figure(fig, path, title: str = "", dpi: int = 100) -> Path:
  """Give `fig` its suptitle (if any), lay it out, write it to `path` and close it; returns the path."""
  import matplotlib.pyplot as plt
  if title:
    fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  path = Path(path)
  fig.savefig(path, dpi=dpi)
  plt.close(fig)
  return path
