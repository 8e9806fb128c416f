"""Ghost Attention (Llama 2 section 3.3; Table 30, Figure 10): instructions, checkers, examples and masks, rejection,
consistency, attention maps."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from l2jax import config as c
from l2jax.data import dialogs as dl
from l2jax.data import gatt as gd
from l2jax.data.tokenizer import Tokenizer, exchange_pieces
from l2jax.eval import attention, consistency
from l2jax.model import llama, presets

REPO = Path(__file__).resolve().parents[1]
TOK = REPO / "data/llama2-tokenizer/tokenizer.model"


@pytest.fixture(scope="module")
def tok():
  return Tokenizer(TOK)


@pytest.fixture(scope="module")
def lists():
  return gd.load_lists(REPO / "data/gatt")


def _encode(tok, msgs):
  """As the SFT stage encodes a JSONL record: check_messages (keeps "train"), then encode_dialog."""
  ids, mask, dropped, trailing = dl.encode_dialog(tok, dl.check_messages(json.loads(json.dumps(msgs))), 10_000)
  assert dropped == 0 and not trailing
  return ids, mask


def test_instruction_appears_once_in_the_first_turn(tok, lists):
  rng = np.random.default_rng(0)
  users, answers = ["Hi there", "Tell me more", "And then?"], ["Hello friend", "It is big", "Then it ends"]
  for n in range(24):
    inst = gd.sample_instruction(rng, lists, gd.KINDS, 3, 0.5)
    placement = gd.PLACEMENTS[n % 2]
    ids, _ = _encode(tok, gd.gatt_example(inst, users, answers, placement))
    text = tok.decode(ids)
    assert text.count(inst.text) == 1, (placement, inst.text, text)
    assert text.index(inst.text) < text.index("[/INST]")  # inside the first [INST] ... [/INST]
    # the sampling prompt has it on every user turn
    samp = gd.sampling_messages(inst, users, answers[:2])
    assert sum(inst.text in m["content"] for m in samp if m["role"] == "user") == 3


def test_loss_mask_is_exactly_the_last_answer_and_its_eos(tok, lists):
  inst = gd.Instruction((gd.Constraint("figure", "Napoleon"),), short=False)
  users, answers = ["Who are you?", "Where do you live?", "What do you eat?"], ["I am him.", "In Paris!", "Bread"]
  for placement in gd.PLACEMENTS:
    ids, mask = _encode(tok, gd.gatt_example(inst, users, answers, placement))
    first_user = f"{inst.text}\n{users[0]}" if placement == "user" else \
        f"<<SYS>>\n{inst.text}\n<</SYS>>\n\n{users[0]}"
    pieces = [exchange_pieces(tok, u, a) for u, a in zip([first_user] + users[1:], answers)]
    assert ids == [t for p, a in pieces for t in p + a]
    last = pieces[-1][1]
    assert last[-1] == tok.eos_id
    assert mask == [0] * (len(ids) - len(last)) + [1] * len(last)
  # "train": false on the middle answer only: answers 1 and 3 (with their EOS) are trained, token by token
  msgs = [{"role": "user", "content": users[i // 2]} if i % 2 == 0 else {"role": "assistant", "content": answers[i // 2]}
          for i in range(6)]
  msgs[3]["train"] = False
  ids, mask = _encode(tok, msgs)
  want = []
  for k, (u, a) in enumerate(zip(users, answers)):
    p, ans = exchange_pieces(tok, u, a)
    want += [0] * len(p) + [int(k != 1)] * len(ans)
  assert mask == want


def test_train_key_errors():
  with pytest.raises(dl._Problem, match="'train' must be true or false"):
    dl.check_messages([{"role": "user", "content": "a", "train": False}, {"role": "assistant", "content": "b"}])
  with pytest.raises(dl._Problem, match="nothing to learn"):
    dl.check_messages([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "train": False}])


def test_shortening_about_half_with_a_fixed_seed(lists):
  draw = lambda: [gd.sample_instruction(np.random.default_rng([5, i]), lists, gd.KINDS, 3, 0.5) for i in range(2000)]
  a, b = draw(), draw()
  assert a == b
  share = np.mean([x.short for x in a])
  assert 0.46 <= share <= 0.54, share
  assert gd.Constraint("figure", "Napoleon").text(True) == "Figure: Napoleon."
  assert gd.Constraint("figure", "Napoleon").text(False) == "Always act as Napoleon from now."
  assert all(len({c.kind for c in x.constraints}) == len(x.constraints) for x in a)
  assert {len(x.constraints) for x in a} == {1, 2, 3}


def test_checkers_and_repair(lists):
  C = gd.Constraint
  assert C("start_word", "Indeed").check("indeed, it is.") and not C("start_word", "Indeed").check("It is indeed")
  assert C("capitals").check("HELLO, 42!") and not C("capitals").check("HELLo") and not C("capitals").check("42")
  assert C("end_sign", "...").check("so ... ") and not C("end_sign", "!").check("so.")
  assert C("language", "French").check("Je ne sais pas, mais il est dans la maison.", lists)
  assert not C("language", "French").check("I do not know, but it is in the house.", lists)
  assert C("hobby", "Tennis").check("anything") is None and C("figure", "Napoleon").check("x") is None
  inst = gd.Instruction((C("start_word", "Behold"), C("capitals"), C("end_sign", "!")))
  fixed = inst.repair("the sea is blue.")
  assert fixed == "BEHOLD, THE SEA IS BLUE!" and inst.check(fixed)
  assert inst.checks("Behold the sea.") == {"start_word": True, "capitals": False, "end_sign": False}


def test_rejection_drops_exactly_the_dialogs_with_a_failing_turn(lists):
  def rec(key, kinds_values, answers):
    inst = gd.Instruction(tuple(gd.Constraint(k, v) for k, v in kinds_values))
    return {"key": key, "instruction": inst.to_json(), "users": ["u"] * len(answers), "answers": answers}
  records = [rec("ok", [("end_sign", "!")], ["a!", "b!", "c!"]),
             rec("bad-last", [("end_sign", "!")], ["a!", "b!", "c"]),
             rec("bad-first", [("start_word", "Yes")], ["No.", "Yes."]),
             rec("ok-2", [("start_word", "Yes"), ("capitals", "")], ["YES SIR", "YES."]),
             rec("bad-mixed", [("start_word", "Yes"), ("capitals", "")], ["YES SIR", "Yes."]),
             rec("no-checker", [("hobby", "Chess")], ["I like it", "sure"]),
             rec("empty", [("hobby", "Chess")], ["I like it", " "])]
  kept, dropped = gd.rejection_filter(records, lists)
  assert [r["key"] for r in kept] == ["ok", "ok-2", "no-checker"]
  assert [r["key"] for r in dropped] == ["bad-last", "bad-first", "bad-mixed", "empty"]
  ex = gd.examples_from(kept[0], "system", all_prefixes=True)
  assert [sum(m["role"] == "assistant" for m in e) for e in ex] == [1, 2, 3]
  assert all([m.get("train", True) for m in e if m["role"] == "assistant"][-1] for e in ex)


def test_consistency_matches_hand_labels(lists):
  C, I = gd.Constraint, gd.Instruction
  insts = [I((C("end_sign", "!"),)), I((C("capitals"),)), I((C("start_word", "Yes"),)), I((C("hobby", "Chess"),))]
  answers = [["a!", "b.", "c!"],        # labels: 1 0 1
             ["ABC", "ABC", "abc"],     #         1 1 0
             ["Yes.", "no"],            #         1 0   (ended after 2 turns)
             ["x", "y", "z"]]           # no checker: not counted
  got = gd.consistency(insts, answers, 4, lists)
  assert got["n"] == [3, 3, 2, 0]
  assert got["all"] == [1.0, pytest.approx(1 / 3), 0.5, None]
  assert got["by_kind"]["end_sign"] == [1.0, 0.0, 1.0, None]
  assert got["by_kind"]["start_word"] == [1.0, 0.0, None, None]
  md = consistency.table({"m": {"consistency": got}}, 4)
  assert "| m | 33% | n/a |" in md


def test_attention_debug_path_equals_the_model_and_direct_softmax():
  cfg = presets.get("test").replace(max_seq_len=64)   # GQA 4 query heads / 2 KV heads
  model = llama.init(cfg, seed=3)
  params = llama.split(model)[1]
  tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 19)).astype(np.int32)
  out = attention.debug_forward(params, cfg, tokens)
  np.testing.assert_allclose(out["logits"], np.asarray(model(jnp.asarray(tokens))), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out["hidden"], np.asarray(model.hidden(jnp.asarray(tokens))[0]), rtol=1e-5, atol=1e-5)
  probs, T = out["probs"], tokens.shape[1]
  assert probs.shape == (cfg.n_layers, 2, cfg.n_heads, T, T)
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
  group = cfg.n_heads // cfg.n_kv_heads
  for l in range(cfg.n_layers):  # softmax(QK^T / sqrt(d) + causal mask), from each layer's input, in numpy
    p = jax.tree.map(lambda a: np.asarray(a[l], np.float64), params["layers"])
    x = out["inputs"][l].astype(np.float64)
    h = x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg.norm_eps) * p["attn_norm"]
    cos, sin = (np.asarray(a, np.float64) for a in llama.rope_angles(jnp.arange(T)[None], cfg.head_dim, cfg.rope_theta))
    def rope(q):
      q0, q1 = q[..., 0::2], q[..., 1::2]
      c_, s_ = cos[:, :, None], sin[:, :, None]
      return np.stack([q0 * c_ - q1 * s_, q0 * s_ + q1 * c_], -1).reshape(q.shape)
    q = rope(np.einsum("btd,dhk->bthk", h, p["wq"]))
    k = rope(np.einsum("btd,dhk->bthk", h, p["wk"]))
    for head in range(cfg.n_heads):
      s = np.einsum("btk,bsk->bts", q[:, :, head], k[:, :, head // group]) / np.sqrt(cfg.head_dim)
      s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
      e = np.exp(s - s.max(-1, keepdims=True))
      np.testing.assert_allclose(probs[l, :, head], e / e.sum(-1, keepdims=True), rtol=1e-4, atol=1e-6)
  span_max = attention.debug_forward(params, cfg, tokens, span=(2, 6))["span_max"]
  np.testing.assert_allclose(span_max, probs[..., 2:6].max(-1), rtol=1e-6)
  curve = attention.attention_to_span(params, cfg, tokens[0], (2, 6))
  assert np.all(curve[:6] == 0) and np.all(curve[6:] > 0)


def test_instruction_token_span(tok):
  inst = gd.Instruction((gd.Constraint("end_sign", "!"),), short=True)
  before, after = "[INST] <<SYS>>\n", "\n<</SYS>>\n\nHello [/INST]"
  a, b = attention.token_span(tok, before, inst.text, after)
  assert tok.decode(tok.encode(before + inst.text + after, bos=True)[a:b]).strip() == inst.text


def test_config_validation():
  with pytest.raises(ValueError, match="constraints.kinds"):
    c.Constraints(kinds=("dance",))
  with pytest.raises(ValueError, match="short_prob"):
    c.Constraints(short_prob=1.5)
  with pytest.raises(ValueError, match="max_per_instruction"):
    c.Constraints(kinds=("capitals",), max_per_instruction=2)
  with pytest.raises(ValueError, match="top_p"):
    c.GAtt(top_p=0.0)
  with pytest.raises(c.ConfigError):
    c.apply_overrides(c.GAtt(), ["eval.turns=0"])


@pytest.mark.slow
def test_gatt_test_experiment_from_an_empty_run_dir(tmp_path):
  env = {**os.environ, "L2JAX_RUNS": str(tmp_path / "runs"), "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  r = subprocess.run([sys.executable, "-m", "l2jax.launch", "experiments/gatt.py:test"], cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  run = tmp_path / "runs" / "gatt-test"
  for f in ("samples.jsonl", "examples.jsonl", "gatt_stats.json", "final/config.json", "consistency.json",
            "consistency.md", "attention.json"):
    assert (run / f).exists(), f
  s = json.loads((run / "consistency.json").read_text())
  assert set(s["models"]) == {"GAtt", "baseline"} and len(s["models"]["GAtt"]["all"]) == 3
  for line in (run / "examples.jsonl").read_text().splitlines():  # every example: instruction once, first turn
    msgs = json.loads(line)["messages"]
    assert msgs[0]["role"] == "system" and sum(msgs[0]["content"] in m["content"] for m in msgs) == 1
    assert [m.get("train", True) for m in msgs if m["role"] == "assistant"][-1] is True
