"""Diversity against temperature: Self-BLEU of samples per prompt (Llama 2 Figure 21, section 5.1).

Self-BLEU (Zhu et al. 2018, Texygen) of N samples of one prompt = the mean over i of
  BLEU(hypothesis s_i, references {s_j : j != i}),
computed with sacrebleu (13a tokenisation, BLEU-4, brevity penalty against the closest reference length,
effective order and "exp" smoothing as in `sacrebleu.sentence_bleu`). Higher Self-BLEU = the samples repeat
each other = less diverse; N identical samples score 100, samples sharing no word about 0. An empty sample
scores 0 as a hypothesis. The paper draws 25 samples per prompt at T = 0.1 ... 1.5 for factual and creative
prompts (the 10 + 10 shipped in data/eval-prompts/) and finds RLHF collapses diversity on factual prompts as T
rises while keeping it on creative ones.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from l2jax.eval import save_figure

TEMPERATURES = tuple(round(0.1 * k, 1) for k in range(1, 16))   # 0.1 ... 1.5, the paper's grid
SAMPLES_PER_PROMPT = 25
PROMPT_SETS = ("factual", "creative")
EVAL_PROMPTS_DIR = Path(__file__).resolve().parents[2] / "data" / "eval-prompts"


def _bleu():
  from sacrebleu.metrics import BLEU
  return BLEU(effective_order=True)


def self_bleu(samples: Sequence[str], bleu=None) -> float:
  """Self-BLEU (0..100) of the samples of one prompt: mean over i of BLEU(s_i, the others). Needs >= 2."""
  samples = [str(s) for s in samples]
  if len(samples) < 2:
    raise ValueError(f"self_bleu: needs at least 2 samples, found {len(samples)}")
  bleu = bleu or _bleu()
  scores = [bleu.sentence_score(h, samples[:i] + samples[i + 1:]).score for i, h in enumerate(samples)]
  return float(np.mean(scores))


def mean_self_bleu(groups: Sequence[Sequence[str]]) -> float:
  """Self-BLEU averaged over prompts (each group: the samples of one prompt)."""
  if not groups:
    raise ValueError("mean_self_bleu: no prompts")
  bleu = _bleu()
  return float(np.mean([self_bleu(g, bleu) for g in groups]))


def read_eval_prompts(name: str, root: str | Path | None = None) -> list[list[dict]]:
  """The shipped prompt set `name` ("factual" | "creative"): dialogs [{"role": "user", "content"}], file order."""
  path = Path(root or EVAL_PROMPTS_DIR) / f"{name}.jsonl"
  if not path.is_file():
    raise FileNotFoundError(f"{path}: prompt set {name!r} not found (expected one of {PROMPT_SETS})")
  out = []
  for i, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      msgs = json.loads(line)["messages"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise ValueError(f"{path}:{i}: expected {{\"messages\": [...]}}: {e}") from None
    out.append(msgs)
  return out


def curve(generate: Callable[[float, int], list[list[str]]], temperatures: Sequence[float] = TEMPERATURES,
          n_samples: int = SAMPLES_PER_PROMPT) -> dict[str, float]:
  """{str(T): mean Self-BLEU over prompts} where generate(T, n) returns n samples for each prompt at T."""
  out = {}
  for t in temperatures:
    groups = generate(float(t), n_samples)
    out[f"{float(t):g}"] = mean_self_bleu(groups)
  return out


def plot(curves: Mapping[str, Mapping[str, Mapping[str, float]]], path: str | Path, title: str = "") -> Path | None:
  """Figure 21: Self-BLEU against temperature, one panel per prompt set, one line per version.

  curves: {prompt set: {version: {str(T): self_bleu}}}. None without matplotlib.
  """
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("diversity: matplotlib is not installed; no PNG written", file=sys.stderr)
    return None
  sets = list(curves)
  fig, axes = plt.subplots(1, max(len(sets), 1), figsize=(5 * max(len(sets), 1), 3.8), squeeze=False)
  for ax, name in zip(axes[0], sets):
    for i, (version, c) in enumerate(curves[name].items()):
      ts = sorted(c, key=float)
      ax.plot([float(t) for t in ts], [c[t] for t in ts], marker="o", ms=3, color=f"C{i % 10}", label=version)
    ax.set_xlabel("temperature")
    ax.set_ylabel("Self-BLEU (higher = less diverse)")
    ax.set_title(f"{name} prompts", fontsize=9)
    ax.legend(fontsize=8)
  return save_figure(fig, path, title)
