"""PPO's prompts and configs (Llama 2 section 3.2.3): the evaluation set that selects final/, the training
splits of the paper-size configs, the bad-record counts, the sampling settings PPO accepts."""
import json
from pathlib import Path

import pytest

from l2jax import config as c
from l2jax.data import prompts as P
from l2jax.data.tokenizer import Tokenizer
from l2jax.launch import load_experiment

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
  return Tokenizer(ROOT / "data/llama2-tokenizer/tokenizer.model")


@pytest.mark.parametrize("variant", ["test", "tiny"])
def test_evaluation_set_mixes_sources_and_safety_and_is_not_the_first_n(variant, tok):
  from l2jax.stages import ppo
  cfg, _ = load_experiment(str(ROOT / f"experiments/ppo.py:{variant}"))
  data = ppo.load_prompts(cfg.prompts, tok, cfg.seed)
  n = cfg.prompts.eval_prompts
  ev = P.eval_stats(data.held)
  assert ev["prompts"] == n == data.stats["eval"]["prompts"] and data.stats["eval"] == ev
  # both kinds, near the held-out half's own share (the source order puts all HH harmless prompts first)
  assert 0.35 <= ev["safety_share"] <= 0.65, ev
  assert {"hh-safety/safety", "hh-helpful/helpful"} <= set(ev["by_stratum"]), ev
  # drawn from the "select" half only (the versions evaluation reports on the "report" half), not the first N
  assert all(P.is_heldout(p, cfg.prompts.heldout_fraction) and P.heldout_part(p) == "select" for p in data.held)
  _, select = P.split_heldout(P.read_prompts(cfg.prompts.sources, skip_bad=True), cfg.prompts.heldout_fraction,
                              part="select")
  _, first, _ = P.encode_prompts(tok, select, cfg.prompts.max_prompt_tokens)
  assert [p.key for p in data.held] != [p.key for p in first[:n]]
  assert not {p.key for p in data.held} & {p.key for p in data.train}
  # seeded: the same seed draws the same set, another seed another one
  assert [p.key for p in ppo.load_prompts(cfg.prompts, tok, cfg.seed).held] == [p.key for p in data.held]
  assert [p.key for p in ppo.load_prompts(cfg.prompts, tok, cfg.seed + 1).held] != [p.key for p in data.held]


@pytest.mark.parametrize("size", ["7b", "13b", "34b", "70b"])
def test_paper_size_configs_train_on_the_train_splits(size):
  cfg, _ = load_experiment(str(ROOT / f"experiments/ppo.py:{size}"))
  paths = [s.split(":", 1)[1] for s in cfg.prompts.sources]
  assert not [p for p in paths if "test" in Path(p).name], paths
  hh = [p for s, p in zip(cfg.prompts.sources, paths) if s.startswith("hh-")]
  assert hh and all(p.startswith("data/hh-rlhf/") and p.endswith("/train.jsonl.gz") for p in hh), hh
  rejection, _ = load_experiment(str(ROOT / f"experiments/rejection.py:{size if size != '34b' else '70b'}"))
  assert set(cfg.prompts.sources) == set(rejection.prompts.sources)   # the prompts rejection sampling reads


def test_skipped_bad_records_are_counted_in_data_stats(tok):
  from l2jax.stages import ppo
  cfg, _ = load_experiment(str(ROOT / "experiments/ppo.py:test"))
  data = ppo.load_prompts(cfg.prompts, tok, cfg.seed)
  bad = data.stats["bad_records"]
  assert len(bad) == 1 and "helpful-base-test.jsonl.gz:121" in bad[0]   # the shipped file's one bad record
  assert data.stats["read"]["skipped_bad"] == 1
  assert data.stats["train"]["skipped_bad"] == data.stats["heldout"]["skipped_bad"] == 1


def test_a_prompts_file_of_only_bad_records_names_the_count(tmp_path, tok):
  from l2jax.stages import ppo
  path = tmp_path / "bad.jsonl"
  path.write_text("nope\n{\n" + json.dumps({"messages": []}) + "\n")
  p = c.Prompts(sources=(f"jsonl:{path}",), skip_bad=True)
  with pytest.raises(ValueError, match=r"no usable training prompt .*: 0 read, 3 bad records skipped"):
    ppo.load_prompts(p, tok)


def test_sampling_settings_ppo_accepts():
  assert c.PPO(temperature=0.7).temperature == 0.7   # scored at the same temperature (test_ppo_rollout.py)
  with pytest.raises(ValueError, match=r"^top_p=0.9: PPO samples from the whole distribution"):
    c.PPO(top_p=0.9)
  for t in (0.0, -1.0, float("nan"), float("inf")):
    with pytest.raises(ValueError, match="^temperature: expected a finite number > 0"):
      c.PPO(temperature=t)
