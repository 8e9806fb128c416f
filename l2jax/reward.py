"""Reward models for later stages (rejection sampling, PPO): `l2jax.reward.load(dir).score(dialogs, responses)`.

A reward-model directory (written by the reward stage) holds params/ ({"backbone": Llama params, "head":
{"w": [dim], "b": []}}), config.json (the backbone's LlamaConfig), tokenizer.model and head.json. A
(dialog, response) is scored exactly as in training: encode_chat(dialog) + the response's answer ids ending
with EOS, and the head at that last token (l2jax.data.preferences.encode_responses). A response cut off by a
token limit (finished=False) is scored as the unfinished answer it is, without EOS: appending one would score a
mid-sentence stop as a complete answer (Llama 2 section 3.2.3, rejection sampling, scores only what was sampled).

  rm = l2jax.reward.load("runs/rm_helpful-tiny/final")
  rm.score([[{"role": "user", "content": "Hi"}], "Tell me a joke"], ["Hello!", "No."])   # float32 [2]
  rm.score(["Tell me a joke"], ["Why did the"], finished=[False])                         # cut off: no EOS
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from l2jax import checkpoint as ckpt_lib
from l2jax.data.preferences import bucket_len, encode_responses, rows_to_arrays
from l2jax.data.tokenizer import Tokenizer
from l2jax.model import llama
from l2jax.model.config import LlamaConfig

HEAD_JSON = "head.json"
Dialog = str | Sequence[dict]


def load_params(ckpt_dir: str | Path, **overrides) -> tuple[LlamaConfig, Any, dict]:
  """(backbone config, params as numpy, head.json) of a reward-model directory, keys and shapes checked."""
  from l2jax.model import heads
  d = ckpt_lib.check_model_dir(ckpt_dir)
  if not (d / HEAD_JSON).is_file():
    raise FileNotFoundError(f"{d}: not a reward-model directory (no {HEAD_JSON}; a language-model checkpoint "
                            f"loads with l2jax.load)")
  cfg = LlamaConfig.load(d / ckpt_lib.CONFIG)
  if overrides:
    cfg = cfg.replace(**overrides)
  meta = json.loads((d / HEAD_JSON).read_text())
  want = llama.split(nnx.eval_shape(lambda: heads.ScalarModel(cfg, rngs=nnx.Rngs(params=0))))[1]
  got = ckpt_lib.restore_params(d / ckpt_lib.PARAMS)
  ckpt_lib.check_tree(want, got, where=str(d / ckpt_lib.PARAMS))
  return cfg, got, meta


class RewardModel:
  """A loaded reward model. `score(dialogs, responses)` -> float32 [B]; `score_tokens` for token batches."""

  def __init__(self, cfg: LlamaConfig, params: Any, tokenizer: Tokenizer, meta: dict, *, batch_size: int = 8,
               seq_len: int | None = None):
    from l2jax.model import heads
    self.cfg, self.tokenizer, self.meta = cfg, tokenizer, meta
    self.batch_size = batch_size
    self.seq_len = min(seq_len or meta.get("seq_len") or cfg.max_seq_len, cfg.max_seq_len)
    graphdef = llama.split(nnx.eval_shape(lambda: heads.ScalarModel(cfg, rngs=nnx.Rngs(params=0))))[0]
    pd = jnp.dtype(cfg.param_dtype)
    self.params = jax.tree.map(lambda a: jnp.asarray(a, pd), params)
    self._score = jax.jit(lambda p, t, m: nnx.merge(graphdef, p)(t, m))

  def score_tokens(self, tokens_bt: jax.Array, mask_bt: jax.Array) -> jax.Array:
    """float32 scores [B] of right-padded token rows (mask 1 on real tokens); jitted per shape."""
    return self._score(self.params, jnp.asarray(tokens_bt, jnp.int32), jnp.asarray(mask_bt, jnp.int32))

  def encode(self, dialogs: Sequence[Dialog], responses: Sequence[str],
             finished: bool | Sequence[bool] = True) -> list[list[int]]:
    """Token rows of each (dialog, response); a dialog is a user message string or a message list ending on user.
    finished[i] False: response i was cut off by a token limit and is encoded without EOS."""
    if len(dialogs) != len(responses):
      raise ValueError(f"score: {len(dialogs)} dialogs but {len(responses)} responses")
    done = [finished] * len(responses) if isinstance(finished, (bool, np.bool_)) else list(finished)
    if len(done) != len(responses):
      raise ValueError(f"score: {len(done)} finished flags for {len(responses)} responses")
    rows = []
    for i, (d, r) in enumerate(zip(dialogs, responses)):
      if not isinstance(r, str):
        raise ValueError(f"score: response {i}: expected a string, found {type(r).__name__} {r!r:.40}")
      if not isinstance(d, (str, list, tuple)):
        raise ValueError(f"score: dialog {i}: expected a user message string or a list of messages, found "
                         f"{type(d).__name__} {d!r:.40}")
      msgs = [{"role": "user", "content": d}] if isinstance(d, str) else list(d)
      try:
        rows += encode_responses(self.tokenizer, msgs, [r], self.seq_len, finished=[bool(done[i])])
      except ValueError as e:
        raise ValueError(f"score: dialog {i}: {e}") from None
    return rows

  def score(self, dialogs: Sequence[Dialog], responses: Sequence[str],
             finished: bool | Sequence[bool] = True) -> np.ndarray:
    """float32 scores [B] of each response after its dialog, in batches of `batch_size` rows; a response with
    finished False (cut off by max_new_tokens) is scored without EOS."""
    rows = self.encode(dialogs, responses, finished)
    out = np.zeros((len(rows),), np.float32)
    for i in range(0, len(rows), self.batch_size):
      chunk = rows[i:i + self.batch_size]
      T = bucket_len(max(len(r) for r in chunk), self.seq_len)
      tokens, mask = rows_to_arrays(chunk + [[]] * (self.batch_size - len(chunk)), T, self.tokenizer.pad_id)
      out[i:i + len(chunk)] = np.asarray(self.score_tokens(tokens, mask))[:len(chunk)]
    return out


def load(ckpt_dir: str | Path, *, batch_size: int = 8, seq_len: int | None = None, **overrides) -> RewardModel:
  """The reward model in a reward-model directory. overrides replace config fields (e.g. dtype="float32")."""
  cfg, params, meta = load_params(ckpt_dir, **overrides)
  tok = Path(ckpt_dir) / ckpt_lib.TOKENIZER
  if not tok.is_file():
    raise FileNotFoundError(f"{ckpt_dir}: no {ckpt_lib.TOKENIZER}")
  return RewardModel(cfg, params, Tokenizer(tok), meta, batch_size=batch_size, seq_len=seq_len)


class Scorer:
  """Both reward models (Llama 2 section 3.2.2) and R_c (section 3.2.3, l2jax.rl.rewards.combine), for rejection
  sampling: score(dialogs, texts, is_safety, finished) -> (helpful [B], safety [B], R_c [B]); a text with
  finished False (cut off by max_new_tokens) is scored without EOS."""

  def __init__(self, rms, batch_size: int):
    """rms: config.RewardModels (helpful, safety, safety_threshold)."""
    if not rms.helpful or not rms.safety:
      raise ValueError("reward_models.helpful and reward_models.safety must both be set")
    self.helpful = load(rms.helpful, batch_size=batch_size)
    self.safety = load(rms.safety, batch_size=batch_size)
    self.threshold = rms.safety_threshold

  def score(self, dialogs, texts, is_safety, finished=True):
    from l2jax.rl.rewards import combine
    h, s = self.helpful.score(dialogs, texts, finished), self.safety.score(dialogs, texts, finished)
    return h, s, np.asarray(combine(h, s, np.asarray(is_safety, bool), self.threshold))
