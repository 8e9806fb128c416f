"""l2jax.gold: loading a gold by "module:function", the shipped golds at hand values, Bradley-Terry labels.

Gao, Schulman & Hilton (2022) section 2: the gold reward labels the preference pairs the proxies learn from.
"""
import math
import warnings

import numpy as np
import pytest

from l2jax import gold


def test_load_shipped_golds():
  texts = ["Lily was happy. She smiled!", "The dog was sad and angry."]
  for name in ("sentiment", "happy", "short_sentences"):
    fn = gold.load(f"l2jax.gold:{name}")
    out = fn(texts)
    assert out.dtype == np.float64 and out.shape == (2,)
    np.testing.assert_array_equal(out, getattr(gold, name)(texts))
    assert fn.spec == f"l2jax.gold:{name}"


def _module(tmp_path, monkeypatch, name, source):
  (tmp_path / f"{name}.py").write_text(source)
  monkeypatch.syspath_prepend(str(tmp_path))


def test_load_user_module(tmp_path, monkeypatch):
  _module(tmp_path, monkeypatch, "l2jax_test_golds_ok", "def score(texts):\n  return [len(t) for t in texts]\n")
  fn = gold.load("l2jax_test_golds_ok:score")
  out = fn(("ab", "", "hello"))
  assert out.dtype == np.float64
  np.testing.assert_array_equal(out, [2.0, 0.0, 5.0])


@pytest.mark.parametrize("spec, match", [
  ("l2jax.gold", r"gold 'l2jax.gold': expected 'module:function'"),
  (":sentiment", r"expected 'module:function'"),
  ("l2jax.gold:", r"expected 'module:function'"),
  ("l2jax_no_such_module_xyz:f", r"cannot import module 'l2jax_no_such_module_xyz': ModuleNotFoundError"),
  ("l2jax.gold:nope", r"gold 'l2jax.gold:nope': module 'l2jax.gold' \(.*gold.py\) has no attribute 'nope'"),
  ("l2jax.gold:HAPPY_CAP", r"gold 'l2jax.gold:HAPPY_CAP': expected a function, found l2jax.gold.HAPPY_CAP of "
                           r"type int \(not callable\)"),
])
def test_load_errors(spec, match):
  with pytest.raises(ValueError, match=match):
    gold.load(spec)


def test_load_module_that_fails_to_import(tmp_path, monkeypatch):
  _module(tmp_path, monkeypatch, "l2jax_test_golds_broken", "raise RuntimeError('boom\\nsecond line')\n")
  with pytest.raises(ValueError) as e:
    gold.load("l2jax_test_golds_broken:score")
  msg = str(e.value)
  assert "\n" not in msg
  assert "cannot import module 'l2jax_test_golds_broken': RuntimeError: boom second line" in msg


def test_wrapper_checks_output(tmp_path, monkeypatch):
  _module(tmp_path, monkeypatch, "l2jax_test_golds_bad", (
    "def short(texts):\n  return [1.0]\n"
    "def nan(texts):\n  return [0.0, float('nan'), 1.0][:len(texts)]\n"
    "def scalar(texts):\n  return 3.0\n"
    "def words(texts):\n  return ['a' for t in texts]\n"))
  with pytest.raises(ValueError, match=r"gold 'l2jax_test_golds_bad:short': returned 1 values for 3 texts"):
    gold.load("l2jax_test_golds_bad:short")(["a", "b", "c"])
  with pytest.raises(ValueError, match=r"gold 'l2jax_test_golds_bad:nan': non-finite value at index 1 \(nan; "
                                       r"text 'second'\)"):
    gold.load("l2jax_test_golds_bad:nan")(["first", "second", "third"])
  with pytest.raises(ValueError, match=r"returned a float of shape \(\), expected 2 values"):
    gold.load("l2jax_test_golds_bad:scalar")(["a", "b"])
  with pytest.raises(ValueError, match=r"expected a sequence of numbers, found list"):
    gold.load("l2jax_test_golds_bad:words")(["a", "b"])
  with pytest.raises(ValueError, match=r"expected texts of type str, found int at index 1"):
    gold.load("l2jax.gold:happy")(["a", 3])


# ----------------------------------------------------------------------------------------------- hand values

def test_sentiment_hand_values():
  out = gold.sentiment(["Lily was happy. She smiled!",     # 5 words, 2 positive: 2 / sqrt(6)
                        "The dog was sad and angry.",      # 6 words, 2 negative: -2 / sqrt(7)
                        "HAPPY, happy... Sad!",            # 3 words, 2 - 1 = 1: 1 / sqrt(4)
                        ""])                               # no words: 0 / sqrt(1)
  np.testing.assert_allclose(out, [0.8164965809, -0.7559289460, 0.5, 0.0], atol=1e-9)


def test_story_hand_values():
  # "Lily was happy. She smiled!": 5 distinct words of 5, sentiment 2 / sqrt(6)
  # "fun fun fun fun": 1 distinct of 4, sentiment 4 / sqrt(5): 4 / sqrt(5) / 4 = 1 / sqrt(5)
  out = gold.story(["Lily was happy. She smiled!", "fun fun fun fun", ""])
  np.testing.assert_allclose(out, [2 / math.sqrt(6), 1 / math.sqrt(5), 0.0], rtol=1e-12)
  assert gold.load("l2jax.gold:story")(["fun fun fun fun"])[0] < gold.sentiment(["fun fun fun fun"])[0]


def test_happy_hand_values():
  out = gold.happy(["Happy happy HAPPY happily day",   # 4 mentions, capped at 3
                    "She was unhappy.",                # 'unhappy' is another word
                    "Happiness, happy."])              # 2
  np.testing.assert_array_equal(out, [3.0, 0.0, 2.0])


def test_short_sentences_hand_values():
  out = gold.short_sentences(["Lily ran. She fell. She cried.",              # 2, 2, 2 words
                              "Once upon a time there was a little girl",    # one sentence of 9 words
                              "Hi! How are you?",                            # 1 and 3 words
                              "..."])                                        # no words
  np.testing.assert_array_equal(out, [-2.0, -9.0, -2.0, -20.0])


# ----------------------------------------------------------------------------------------------- Bradley-Terry

def test_bt_probability_hand_values():
  p = gold.bt_probability([1.0, 0.0, 2.0], [0.0, 1.0, 2.0], 0.5)
  np.testing.assert_allclose(p, [0.8807970780, 0.1192029220, 0.5], atol=1e-9)   # sigmoid(2), sigmoid(-2)
  np.testing.assert_array_equal(gold.bt_probability([1.0, 0.0, 2.0], [0.0, 1.0, 2.0], 0), [1.0, 0.0, 0.5])
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    np.testing.assert_array_equal(gold.bt_probability([1e6, -1e6], [0.0, 0.0], 1e-3), [1.0, 0.0])


def test_bt_errors():
  with pytest.raises(ValueError, match=r"bt_probability: expected a temperature >= 0, found -1"):
    gold.bt_probability([1.0], [0.0], -1)
  with pytest.raises(ValueError, match=r"of one shape, found \(2,\) and \(3,\)"):
    gold.bt_labels([1.0, 2.0], [0.0, 0.0, 0.0], 1.0, np.random.default_rng(0))
  with pytest.raises(ValueError, match=r"expected finite gold scores"):
    gold.expected_agreement([np.nan], [0.0], 1.0)


def test_bt_labels_temperature_zero_follow_the_gold():
  rng = np.random.default_rng(1)
  a, b = np.array([3.0, 1.0, 2.0]), np.array([1.0, 3.0, 0.0])
  np.testing.assert_array_equal(gold.bt_labels(a, b, 0.0, rng), [True, False, True])
  assert gold.expected_agreement(a, b, 0.0) == 1.0
  ties = gold.bt_labels(np.zeros(4000), np.zeros(4000), 0.0, rng)
  assert abs(ties.mean() - 0.5) < 3 * math.sqrt(0.25 / 4000)   # ties: a fair coin
  assert math.isnan(gold.expected_agreement([1.0], [1.0], 0.5))


def test_bt_labels_agree_as_often_as_expected():
  """Counting: over 20,000 pairs, the share of labels agreeing with the gold ordering is expected_agreement
  within 3 standard errors (the sum of independent Bernoulli(q_i), q_i = max(p_i, 1 - p_i))."""
  rng = np.random.default_rng(0)
  n, t = 20_000, 0.7
  a, b = rng.normal(size=n), rng.normal(size=n)
  agree = gold.bt_labels(a, b, t, rng) == (a > b)
  p = gold.bt_probability(a, b, t)
  q = np.maximum(p, 1 - p)
  expected = gold.expected_agreement(a, b, t)
  assert 0.65 < expected < 0.9                    # a noisy labeller, not a trivial one
  assert abs(agree.mean() - expected) < 3 * math.sqrt(np.sum(q * (1 - q))) / n


def test_bt_labels_constant_gap_closed_form():
  """All gaps 1 at temperature 1: every label agrees with probability sigmoid(1) = 0.7311 (closed form)."""
  rng = np.random.default_rng(2)
  n = 20_000
  a = rng.normal(size=n)
  b = np.where(rng.random(n) < 0.5, a - 1.0, a + 1.0)     # a better in half the pairs, b in the other half
  assert gold.expected_agreement(a, b, 1.0) == pytest.approx(0.7310585786, abs=1e-9)
  agree = gold.bt_labels(a, b, 1.0, rng) == (a > b)
  assert abs(agree.mean() - 0.7310585786) < 3 * math.sqrt(0.7310585786 * 0.2689414214 / n)
