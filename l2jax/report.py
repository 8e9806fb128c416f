"""One report per run: `python -m l2jax.report RUN_DIR` writes RUN_DIR/report.md and its PNGs.

Works on the run directory of any stage (pretrain, sft, reward, rejection, ppo, gatt) and on a composed
iterative-RLHF run (experiments/rlhf.py), whose versions.json lists its stages in order. For each stage:
  - its key config (from config.json) and the model architecture (from final/config.json);
  - where each checkpoint is (final/, value/, checkpoints/<step>);
  - loss and reward curves from metrics.jsonl (report/curves-<stage>.png) and the last value of each metric;
  - what the stage wrote: every Markdown summary (Table 8 reward_eval.md, rejection summary.md, the GAtt
    consistency table consistency.md, ...) inline, and every PNG it wrote;
  - a few lines of samples.jsonl.
A composed run adds the versions table and the evaluation of all versions (RUN_DIR/eval/compare.md: win rates
of Figure 11, reward distributions of Figure 20, Self-BLEU of Figure 21, Figure 32, safety rates, Table 8).
Figures of stages outside RUN_DIR (e.g. the SFT and reward-model runs under runs/) are copied into
RUN_DIR/report/, so every figure the report links lies under RUN_DIR. How to read it: docs/rlhf.md.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

REPORT = "report.md"
ASSETS = "report"
VERSIONS = "versions.json"
KEY_FIELDS = ("name", "mode", "objective", "size", "init", "sampler", "policy", "pool", "iteration", "sft",
              "rm_helpful", "rm_safety", "reward_models.helpful", "reward_models.safety", "value_init", "margin",
              "data.kind", "data.paths", "data.sources", "data.mix", "prompts.sources", "seq_len", "global_batch",
              "epochs", "steps", "iterations", "batch_prompts", "minibatch", "samples_per_prompt", "temperature",
              "max_new_tokens", "kl_beta", "optim.lr", "optim.schedule", "turns", "constraints.kinds",
              "rs_versions", "gatt_after", "pool_from", "ppo", "final_stage", "dpo", "ppo_after_rs", "ppo_iterations",
              "rescale_temperature",
              "temperature_from", "judge_helpful", "judge_safety", "data.part", "eval.heldout_part", "base", "gold",
              "label_temperature", "pairs", "methods", "bon_n", "train_prompts", "report_prompts", "measure_samples")
DOCS = {"overoptimization": "docs/overoptimization.md"}   # how to read a stage's report (default docs/rlhf.md)
CURVE = re.compile(r"loss|reward|score|kl|acc|(^|_|/)r[chs]($|_)|violation|entropy|clip|explained|ppl|length|eos")
NOT_CURVE = re.compile(r"time|tokens|mfu|crc|fingerprint|weight|seconds|_s$|finite|step")
MAX_PANELS = 12


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def _read_json(path: Path) -> Any:
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def read_metrics(run_dir: Path) -> list[dict]:
  """The rows of run_dir/metrics.jsonl (unreadable lines skipped)."""
  rows = []
  p = run_dir / "metrics.jsonl"
  if p.is_file():
    for line in p.read_text().splitlines():
      try:
        r = json.loads(line)
      except ValueError:
        continue
      if isinstance(r, dict) and "step" in r:
        rows.append(r)
  return rows


def _series(rows: list[dict]) -> dict[str, list[tuple[float, float]]]:
  """{metric: [(step, value)]} of the finite numeric metrics (the last row of a repeated step wins)."""
  by: dict[str, dict] = {}
  for r in rows:
    for k, v in r.items():
      if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        by.setdefault(k, {})[r["step"]] = float(v)
  return {k: sorted(d.items()) for k, d in by.items()}


def curve_keys(series: dict) -> list[str]:
  """The metrics worth a panel: losses first, then rewards / KL / accuracy and the like, at most MAX_PANELS."""
  keys = [k for k in series if CURVE.search(k) and not NOT_CURVE.search(k)]
  keys.sort(key=lambda k: (0 if k == "loss" else 1 if "loss" in k else 2, k))
  return keys[:MAX_PANELS]


def plot_curves(series: dict, keys: list[str], path: Path, title: str) -> Path | None:
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return None
  cols = min(3, len(keys))
  rows = -(-len(keys) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
  for ax in axes.flat[len(keys):]:
    ax.axis("off")
  for ax, k in zip(axes.flat, keys):
    xy = series[k]
    ax.plot([x for x, _ in xy], [y for _, y in xy], marker="." if len(xy) < 30 else None, lw=1)
    ax.set_title(k, fontsize=8)
    ax.set_xlabel("step", fontsize=7)
    ax.tick_params(labelsize=7)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path


def _fmt(v: Any) -> str:
  if isinstance(v, float):
    return f"{v:.4g}"
  if isinstance(v, (list, tuple)):
    return ", ".join(map(str, v)) if v else "()"
  return str(v)


def _demote(md: str, levels: int = 3) -> str:
  """Markdown with every heading moved down `levels` levels (so an included file nests under its section)."""
  return "\n".join("#" * levels + line if line.startswith("#") else line for line in md.splitlines())


def _slug(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "run"


def _checkpoints(run_dir: Path) -> list[str]:
  lines = []
  for name in ("final", "value"):
    d = run_dir / name
    if not (d / "config.json").is_file():
      continue
    head = _read_json(d / "head.json")
    kind = "language model (l2jax checkpoint directory)"
    if isinstance(head, dict):
      kind = f"{head.get('objective', '')} {'reward' if head.get('kind') == 'reward_model' else 'scalar'} model".strip()
    arch = _read_json(d / "config.json") or {}
    shape = ", ".join(f"{k} {arch[k]}" for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size") if k in arch)
    lines.append(f"- `{d}`: {kind}" + (f" ({shape})" if shape else ""))
  ck = run_dir / "checkpoints"
  if ck.is_dir():
    steps = sorted(int(p.name) for p in ck.iterdir() if p.name.isdigit())
    if steps:
      lines.append(f"- `{ck}/`: training checkpoints at steps {', '.join(map(str, steps))} (resume)")
  if (run_dir / "proxies.json").is_file():   # the over-optimisation benchmark: no final/, its sub-runs instead
    return lines + _gold_benchmark(run_dir)
  if not any(l.startswith(f"- `{run_dir / 'final'}`") for l in lines):
    lines.append("- no final/ yet (the run has not finished)")
  return lines


def _gold_benchmark(run_dir: Path) -> list[str]:
  """The over-optimisation benchmark's labels and proxies (l2jax/stages/overoptimization.py)."""
  labels = _read_json(run_dir / "pairs" / "labels.json") or {}
  proxies = _read_json(run_dir / "proxies.json") or {}
  out = []
  if labels:
    t = labels.get("train", {})
    out.append(f"- labels: {t.get('pairs')} training pairs, Bradley-Terry temperature "
               f"{labels.get('label_temperature')}: {_fmt(100 * t.get('label_gold_agreement', float('nan')))}% agree with the gold order (expected "
               f"{_fmt(100 * t.get('expected_agreement', float('nan')))}%)")
  out += ["", "| proxy | held-out pairs | accuracy vs labels | accuracy vs gold order |", "|---|---:|---:|---:|"]
  out += [f"| {k} (`proxy-{k.split()[0]}/final`) | {v['pairs']} | {_fmt(100 * v['accuracy_vs_labels'])}% | "
          f"{_fmt(100 * v['accuracy_vs_gold'])}% |" for k, v in proxies.items()]
  return out


class Writer:
  """Collects the report's Markdown; figures outside `root` are copied into root/report/."""

  def __init__(self, root: Path):
    self.root, self.lines = root, []
    self.assets = root / ASSETS

  def figure(self, path: Path, alt: str, prefix: str) -> None:
    path = Path(path)
    try:
      rel = path.resolve().relative_to(self.root.resolve())
    except ValueError:
      self.assets.mkdir(parents=True, exist_ok=True)
      dest = self.assets / f"{_slug(prefix)}-{path.name}"
      shutil.copyfile(path, dest)
      rel = dest.relative_to(self.root)
    self.lines.append(f"![{alt}]({rel.as_posix()})")
    self.lines.append("")

  def stage(self, run_dir: Path, title: str, level: int = 2) -> None:
    """One stage's section: key config, checkpoints, curves, its own summaries and figures, samples."""
    h = "#" * level
    cfg = _read_json(run_dir / "config.json")
    flat = _flatten(cfg) if isinstance(cfg, dict) else {}
    stage = flat.get("stage", "?")
    self.lines += [f"{h} {title} ({stage})", "", f"Run directory: `{run_dir}`", ""]
    if flat:
      shown = [(k, flat[k]) for k in KEY_FIELDS if k in flat and flat[k] not in ("", (), [])]
      self.lines += ["| key config | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in shown] + [""]
    self.lines += [f"{h}# Checkpoints", ""] + _checkpoints(run_dir) + [""]
    rows = read_metrics(run_dir)
    series = _series(rows)
    keys = curve_keys(series)
    if keys:
      self.lines += [f"{h}# Curves", ""]
      png = plot_curves(series, keys, self.assets / f"curves-{_slug(title)}.png", f"{title}: metrics.jsonl")
      if png is not None:
        self.figure(png, f"{title} curves", title)
      last = {k: series[k][-1] for k in sorted(series)}
      self.lines += ["| metric | first | last (step) |", "|---|---|---|"]
      self.lines += [f"| {k} | {_fmt(series[k][0][1])} | {_fmt(v)} ({int(s)}) |" for k, (s, v) in last.items()
                     if k in keys or k in ("lr", "grad_norm", "eval_loss", "eval_ppl", "tokens_per_s")] + [""]
    mds = sorted(p for p in run_dir.glob("*.md") if p.name != REPORT)
    pngs = sorted(run_dir.glob("*.png"))
    if mds or pngs:
      self.lines += [f"{h}# Results", ""]
      for p in mds:
        self.lines += [f"From `{p.name}`:", "", _demote(p.read_text().strip(), level + 1), ""]
      for p in pngs:
        self.figure(p, p.stem, title)
    samples = run_dir / "samples.jsonl"
    if samples.is_file():
      head = [l for l in samples.read_text().splitlines()[:2] if l.strip()]
      if head:
        self.lines += [f"{h}# Samples (first {len(head)} of `samples.jsonl`)", "", "```"]
        self.lines += [l if len(l) <= 400 else l[:400] + " ..." for l in head] + ["```", ""]
    if cfg is not None:
      self.lines += ["<details><summary>full config</summary>", "", "```json", json.dumps(cfg, indent=1), "```",
                     "", "</details>", ""]

  def evaluation(self, eval_dir: Path, level: int = 2) -> None:
    """The versions evaluation: compare.md (win rates, safety rates, figures) and, from GAtt on, Table 30."""
    md = eval_dir / "compare.md"
    if md.is_file():
      self.lines += ["#" * level + " Evaluation of the versions (python -m l2jax.eval compare)", ""]
      for line in md.read_text().splitlines():
        m = re.fullmatch(r"!\[(.*)\]\((.*)\)", line.strip())
        if m and (eval_dir / m.group(2)).is_file():
          self.figure(eval_dir / m.group(2), m.group(1), "eval")
        elif not m:
          self.lines.append(line)
      self.lines.append("")
    cons = eval_dir / "consistency.md"
    if cons.is_file():
      self.lines += ["#" * level + " Multi-turn consistency of the versions from GAtt on (Table 30)", "",
                     "Share of answers that follow the first turn's instruction at each turn (greedy answers to the "
                     "GAtt experiment's held-out dialogs; the first row is the version GAtt started from).", "",
                     cons.read_text().strip(), ""]
      for name in ("consistency.png", "attention.png"):
        if (eval_dir / name).is_file():
          self.figure(eval_dir / name, Path(name).stem, "eval")


def _versions_table(versions: list[dict], root: Path) -> list[str]:
  lines = ["| version | stage | from | run directory | final |", "|---|---|---|---|---|"]
  for v in versions:
    final = Path(v.get("final", ""))
    done = "yes" if (final / "config.json").is_file() else "missing"
    lines.append(f"| {v['version']} | {v.get('stage', '')} | {v.get('from', '')} | `{v.get('run_dir', '')}` | "
                 f"`{final}` ({done}) |")
  return lines + [""]


def check_run_dir(root: Path) -> None:
  """FileNotFoundError (one line) unless `root` is a run directory: its config.json is a run config (it names a
  "stage"; a model directory's config.json is the architecture) or it holds a composed run's versions.json. A report
  is written into the directory, so a model directory (e.g. RUN/final) must never get one."""
  cfg = _read_json(root / "config.json")
  if isinstance(cfg, dict) and "stage" in cfg or (root / VERSIONS).is_file():
    return
  if (root / "tokenizer.model").is_file() or (isinstance(cfg, dict) and "dim" in cfg):
    raise FileNotFoundError(f"{root}: a model directory, not a run directory; give the run directory that holds it "
                            f"({root.parent})")
  raise FileNotFoundError(f"{root}: not an l2jax run directory (no run config.json naming a stage)")


def write(run_dir: str | Path) -> Path:
  """Write run_dir/report.md (+ run_dir/report/*.png); return its path."""
  root = Path(run_dir)
  if not root.is_dir():
    raise FileNotFoundError(f"{root}: run directory not found")
  check_run_dir(root)
  if (root / ASSETS).is_dir():
    shutil.rmtree(root / ASSETS)
  w = Writer(root)
  cfg = _read_json(root / "config.json") or {}
  name = cfg.get("name", root.name) if isinstance(cfg, dict) else root.name
  doc = DOCS.get(cfg.get("stage") if isinstance(cfg, dict) else None, "docs/rlhf.md")
  w.lines += [f"# Report: {name}", "", f"`python -m l2jax.report {root}` at {time.strftime('%Y-%m-%d %H:%M:%S')}. "
              f"How to read it: {doc}.", ""]
  versions = _read_json(root / VERSIONS)
  if isinstance(versions, list) and versions:
    w.lines += ["## Versions", ""] + _versions_table(versions, root)
    w.evaluation(root / "eval")
    for v in versions:
      d = Path(v.get("run_dir", ""))
      d = d if d.is_absolute() or d.exists() else root / d
      if d.is_dir():
        w.stage(d, f"{v['version']}", level=2)
    if cfg:
      w.lines += ["## The composed run's config", "", "```json", json.dumps(cfg, indent=1), "```", ""]
  else:
    w.stage(root, name, level=2)
    w.evaluation(root / "eval")
  out = root / REPORT
  out.write_text("\n".join(w.lines).rstrip() + "\n")
  return out


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m l2jax.report", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("run_dir", help="a run directory (any stage, or a composed experiments/rlhf.py run)")
  args = ap.parse_args(argv)
  try:
    out = write(args.run_dir)
  except (FileNotFoundError, NotADirectoryError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {out}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
