"""python -m l2jax.report: report.md for single-stage and composed runs; every linked figure exists."""
import json
import re
from pathlib import Path

import pytest

from l2jax import report


def _png(path: Path) -> Path:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(1, 1))
  ax.plot([0, 1])
  fig.savefig(path)
  plt.close(fig)
  return path


def _fake_run(d: Path, stage: str, name: str, metrics: list[dict], reward_model: bool = False) -> Path:
  d.mkdir(parents=True)
  (d / "config.json").write_text(json.dumps({"stage": stage, "name": name, "init": "runs/x/final", "seq_len": 64,
                                             "optim": {"lr": 0.001, "schedule": "cosine"}, "steps": len(metrics)}))
  with open(d / "metrics.jsonl", "w") as f:
    for m in metrics:
      f.write(json.dumps(m) + "\n")
    f.write("not json\n")                                     # a torn line is skipped
  (d / "final").mkdir()
  (d / "final" / "config.json").write_text(json.dumps({"dim": 32, "n_layers": 2, "n_heads": 4, "vocab_size": 128}))
  if reward_model:
    (d / "final" / "head.json").write_text(json.dumps({"kind": "reward_model", "objective": "safety"}))
  (d / "checkpoints" / "10").mkdir(parents=True)
  (d / "samples.jsonl").write_text(json.dumps({"prompt": "Hi", "response": "Hello"}) + "\n")
  return d


def _links(md: str) -> list[str]:
  return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)


def test_single_stage_report(tmp_path):
  rows = [{"step": s, "loss": 5.0 - 0.1 * s, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 100.0} for s in range(1, 11)]
  rows.append({"step": 10, "eval_loss": 4.2, "eval/helpful_held-out/accuracy": 0.6, "rc": float("nan")})
  d = _fake_run(tmp_path / "rm", "reward", "rm-test", rows, reward_model=True)
  (d / "reward_eval.md").write_text("| Test set | Avg |\n|---|---|\n| helpful | 60.0 |\n")
  _png(d / "reward_eval.png")
  assert report.main([str(d)]) == 0
  md = (d / "report.md").read_text()
  links = _links(md)
  assert links and all((d / l).is_file() for l in links)
  assert "report/curves-rm-test.png" in links and "reward_eval.png" in links
  assert "| loss | 4.9 | 4 (10) |" in md                     # first and last loss from metrics.jsonl
  assert "eval/helpful_held-out/accuracy" in md and "| helpful | 60.0 |" in md   # Table 8 inlined
  assert "safety reward model" in md and "steps 10" in md     # where the checkpoints are
  assert "| optim.lr | 0.001 |" in md and "tokens_per_s" in md
  assert "rc" not in [k for k in report._series(report.read_metrics(d))]   # NaN is not a point


def test_composed_report_copies_outside_figures(tmp_path):
  root = tmp_path / "rlhf"
  root.mkdir()
  (root / "config.json").write_text(json.dumps({"stage": "rlhf", "name": "rlhf-test", "rs_versions": 1}))
  sft = _fake_run(tmp_path / "runs" / "sft-test", "sft", "sft-test", [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}])
  _png(sft / "outside.png")
  v1 = _fake_run(root / "v1-rs", "rejection", "rlhf-test-v1", [{"step": 1, "loss": 2.0, "eval_rc": 0.1}])
  _png(v1 / "figure7.png")
  (v1 / "summary.md").write_text("# rejection: best_of_k, iteration 1\n\n- pool: 6 prompts\n")
  ev = root / "eval"
  ev.mkdir()
  _png(ev / "fig11_winrate.png")
  (ev / "compare.md").write_text("| version | win |\n|---|---|\n| V1 | 55.0 |\n\n![winrate](fig11_winrate.png)\n"
                                 "![missing](not_written.png)\n")
  (root / "versions.json").write_text(json.dumps([
      {"version": "SFT", "stage": "sft", "run_dir": str(sft), "final": str(sft / "final")},
      {"version": "V1", "stage": "rejection", "from": "SFT", "run_dir": "v1-rs", "final": str(v1 / "final")},
      {"version": "V2", "stage": "rejection", "from": "V1", "run_dir": "v2-rs", "final": str(root / "v2-rs/final")}]))
  out = report.write(root)
  md = out.read_text()
  links = _links(md)
  assert all((root / l).is_file() for l in links), links
  assert "report/SFT-outside.png" in links                  # copied in from outside the run directory
  assert "v1-rs/figure7.png" in links and "eval/fig11_winrate.png" in links
  assert "not_written.png" not in md
  assert "| V1 | 55.0 |" in md and "#### rejection: best_of_k, iteration 1" in md   # headings demoted
  assert "| V2 | rejection | V1 |" in md and "(missing)" in md
  # rewriting replaces the report's own figures (no stale copies)
  (sft / "outside.png").unlink()
  md2 = report.write(root).read_text()
  assert "outside.png" not in md2 and not (root / "report" / "SFT-outside.png").exists()


def test_report_refuses_non_run_dirs(tmp_path, capsys):
  assert report.main([str(tmp_path / "missing")]) == 2
  with pytest.raises(FileNotFoundError, match="not an l2jax run directory"):
    report.write(tmp_path)
  # a model directory (RUN/final: the architecture's config.json, tokenizer.model) never gets a report written into it
  run = _fake_run(tmp_path / "sft-test", "sft", "sft-test", [{"step": 1, "loss": 3.0}])
  (run / "final" / "tokenizer.model").write_bytes(b"x")
  capsys.readouterr()
  assert report.main([str(run / "final")]) == 2
  err = capsys.readouterr().err.strip()
  assert err == f"error: {run / 'final'}: a model directory, not a run directory; give the run directory that holds " \
                f"it ({run})", err
  assert not (run / "final" / "report.md").exists() and not (run / "final" / "report").exists()
  assert report.main([str(run)]) == 0 and (run / "report.md").is_file()


def test_composed_report_shows_consistency_per_version(tmp_path):
  root = tmp_path / "rlhf"
  (root / "eval").mkdir(parents=True)
  (root / "config.json").write_text(json.dumps({"stage": "rlhf", "name": "rlhf-test"}))
  (root / "versions.json").write_text(json.dumps([{"version": "V1", "stage": "rejection", "run_dir": "v1-rs",
                                                   "final": str(root / "v1-rs/final")}]))
  (root / "eval" / "consistency.md").write_text("| model | turn 2 |\n|---|---:|\n| V1+GAtt | 75% |\n| V2 | 50% |\n")
  _png(root / "eval" / "consistency.png")
  md = report.write(root).read_text()
  assert "Multi-turn consistency of the versions from GAtt on (Table 30)" in md and "| V2 | 50% |" in md
  assert "eval/consistency.png" in _links(md)
