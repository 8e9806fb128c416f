"""l2jax.eval.overoptimization: best-of-n KL and exact expectation, Gao et al.'s functional forms, table, figure.

Gao, Schulman & Hilton (2022): KL_bon(n) = log n - (n - 1) / n (section 2); R_bon(d) = d (alpha - beta d) and
R_RL(d) = d (alpha - beta log d) with d = sqrt(KL) (section 3).
"""
import itertools
import json
import math

import numpy as np
import pytest

from l2jax.eval import overoptimization as oo


def test_bon_kl_hand_values():
  assert oo.bon_kl(1) == 0.0
  assert oo.bon_kl(2) == pytest.approx(0.1931471806, abs=1e-9)          # log 2 - 1/2
  assert oo.bon_kl(64) == pytest.approx(3.1745080830, abs=1e-9)         # 6 log 2 - 63/64 = 4.1588830834 - 0.984375
  np.testing.assert_allclose(oo.bon_kl([1, 2, 64]), [0.0, 0.1931471806, 3.1745080830], atol=1e-9)
  with pytest.raises(ValueError, match=r"bon_kl: expected n >= 1, found 0"):
    oo.bon_kl(0)


def _brute_force(proxy_pk, value_pk, n):
  """Mean over prompts of the mean over all n-subsets of value at the subset's highest proxy (first on ties)."""
  per_prompt = []
  for proxy, value in zip(proxy_pk, value_pk):
    picks = [value[s[int(np.argmax(proxy[list(s)]))]] for s in itertools.combinations(range(len(proxy)), n)]
    per_prompt.append(np.mean(picks))
  return float(np.mean(per_prompt))


def test_bon_expectation_equals_enumeration():
  rng = np.random.default_rng(0)
  proxy, value = rng.normal(size=(3, 6)), rng.normal(size=(3, 6))
  for n in range(1, 7):
    assert oo.bon_expectation(proxy, value, n) == pytest.approx(_brute_force(proxy, value, n), abs=1e-12)
  assert oo.bon_expectation(proxy, value, 1) == pytest.approx(value.mean(), abs=1e-12)
  at_argmax = value[np.arange(3), np.argmax(proxy, axis=1)].mean()
  assert oo.bon_expectation(proxy, value, 6) == pytest.approx(at_argmax, abs=1e-12)


def test_bon_expectation_ties_go_to_the_lower_index():
  proxy, value = np.array([[1.0, 2.0, 2.0, 0.0]]), np.array([[10.0, 20.0, 30.0, 40.0]])
  # the 6 pairs: {0,1}->20 {0,2}->30 {0,3}->10 {1,2}->20 (tie: index 1) {1,3}->20 {2,3}->30: 130 / 6
  assert oo.bon_expectation(proxy, value, 2) == pytest.approx(130 / 6, abs=1e-12)
  assert oo.bon_expectation(proxy, value, 4) == 20.0
  for n in range(1, 5):
    assert oo.bon_expectation(proxy, value, n) == pytest.approx(_brute_force(proxy, value, n), abs=1e-12)


def test_bon_expectation_large_k_is_stable():
  rng = np.random.default_rng(1)
  proxy, value = rng.normal(size=(2, 256)), rng.normal(size=(2, 256))
  for n in (1, 2, 128, 255, 256):
    assert oo.bon_expectation(proxy, np.ones_like(value), n) == pytest.approx(1.0, abs=1e-12)   # weights sum to 1
  assert oo.bon_expectation(proxy, value, 256) == pytest.approx(value[[0, 1], np.argmax(proxy, 1)].mean(), abs=1e-12)
  assert np.isfinite(oo.bon_expectation(proxy, value, 128))


def test_bon_expectation_errors():
  with pytest.raises(ValueError, match=r"expected 1 <= n <= K = 3, found n = 4"):
    oo.bon_expectation(np.zeros((2, 3)), np.zeros((2, 3)), 4)
  with pytest.raises(ValueError, match=r"of one shape \[P, K >= 1\], found \(2, 3\) and \(2, 4\)"):
    oo.bon_expectation(np.zeros((2, 3)), np.zeros((2, 4)), 1)


# ----------------------------------------------------------------------------------------------- fits

def test_predict_hand_values():
  assert oo.predict_bon(2.0, 2.0, 0.5) == pytest.approx(2.0)               # 2 (2 - 0.5 * 2)
  assert oo.predict_rl(math.e, 1.0, 0.5) == pytest.approx(math.e / 2)      # e (1 - 0.5 log e)
  np.testing.assert_array_equal(oo.predict_rl([0.0], 1.0, 0.5), [0.0])


def test_fit_bon_recovers_known_parameters():
  d = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0])
  r = np.array([0.0, 0.875, 1.5, 1.875, 2.0, 1.5])            # d (2 - 0.5 d) by hand
  alpha, beta = oo.fit_bon(d, r)
  assert (alpha, beta) == (pytest.approx(2.0, abs=1e-10), pytest.approx(0.5, abs=1e-10))
  noisy = r + np.random.default_rng(0).normal(0.0, 0.01, size=r.shape)
  alpha, beta = oo.fit_bon(d, noisy)
  assert abs(alpha - 2.0) < 0.05 and abs(beta - 0.5) < 0.05


def test_fit_rl_recovers_known_parameters():
  d = np.array([0.0, 0.5, 1.0, 2.0, math.e, 4.0])
  r = d * (1.0 - 0.5 * np.log(np.where(d > 0, d, 1.0)))       # 0 at d = 0; 1 at d = 1; e / 2 at d = e
  np.testing.assert_allclose(r[[2, 4]], [1.0, 1.3591409142], atol=1e-9)
  alpha, beta = oo.fit_rl(d, r)
  assert (alpha, beta) == (pytest.approx(1.0, abs=1e-10), pytest.approx(0.5, abs=1e-10))
  noisy = r + np.random.default_rng(1).normal(0.0, 0.01, size=r.shape)
  alpha, beta = oo.fit_rl(d, noisy)
  assert abs(alpha - 1.0) < 0.05 and abs(beta - 0.5) < 0.05


def test_fits_need_two_points():
  with pytest.raises(ValueError, match=r"fit_bon: expected at least 2 points with distinct finite sqrt\(KL\) > 0, "
                                       r"found 1 \(of 2 points\)"):
    oo.fit_bon([0.0, 1.0], [0.0, 1.0])
  with pytest.raises(ValueError, match=r"fit_rl: .* found 1 \(of 3 points\)"):
    oo.fit_rl([0.0, 1.0, 1.0], [0.0, 1.0, 2.0])


def test_peak():
  assert oo.peak([0.0, 1.0, 2.0, 3.0], [0.0, 0.5, 0.7, 0.2]) == (0.7, 2.0)
  assert oo.peak([0.0, 1.0], [1.0, 1.0]) == (1.0, 0.0)                     # ties: the first
  assert oo.peak([0.0, 1.0], [np.nan, 0.3]) == (0.3, 1.0)


# ----------------------------------------------------------------------------------------------- table, figure

def _curves():
  n = np.array([1, 2, 4, 8, 16])
  return [
    {"method": "best-of-n", "proxy": "256 pairs", "kl": oo.bon_kl(n).tolist(), "gold": [0.1, 0.3, 0.45, 0.5, 0.4],
     "proxy_score": [0.0, 0.4, 0.7, 0.9, 1.1]},
    {"method": "ppo", "proxy": "256 pairs", "kl": [0.0, 0.5, 2.0, 6.0], "gold": [0.2, 0.6, 0.5, 0.1],
     "proxy_score": [1.0, 1.5, 2.0, 2.6], "wall_s": [0.0, 10.0, 20.0, 30.0]},
    {"method": "ppo", "proxy": "64 pairs", "kl": [0.0], "gold": [0.2], "proxy_score": [1.0]},
  ]


def test_table_rows_hand_made_curves():
  bon, ppo, single = oo.table_rows(_curves())
  assert bon["peak_gold"] == 0.5
  assert bon["kl_at_peak"] == pytest.approx(1.2044415416, abs=1e-9)        # log 8 - 7/8 = 2.0794415416 - 0.875
  assert (bon["final_gold"], bon["points"], bon["form"]) == (0.4, 5, "bon")
  assert bon["alpha"] > 0 and bon["beta"] > 0                               # rises, then bends down
  assert (ppo["peak_gold"], ppo["kl_at_peak"], ppo["final_gold"], ppo["form"]) == (0.6, 0.5, 0.1, "rl")
  assert ppo["alpha"] is not None and ppo["beta"] > 0
  assert (single["alpha"], single["beta"], single["points"], single["peak_gold"]) == (None, None, 1, 0.2)
  md = oo.table_markdown([bon, ppo, single])
  assert md.startswith("| method | proxy | points | peak gold | KL at peak |")
  assert "| best-of-n | 256 pairs | 5 | 0.5 | 1.204 | 0.4 | 1.835 | bon |" in md
  assert "| ppo | 64 pairs | 1 | 0.2 | 0 | 0.2 | 0 | rl | — | — |" in md


def test_table_rows_errors():
  with pytest.raises(ValueError, match=r"curves\[0\] \('ppo', 'x'\): missing keys \['proxy_score'\]"):
    oo.table_rows([{"method": "ppo", "proxy": "x", "kl": [0.0], "gold": [0.0]}])
  with pytest.raises(ValueError, match=r"curves\[0\] .* of one length >= 1, found \(2,\), \(1,\), \(1,\)"):
    oo.table_rows([{"method": "ppo", "proxy": "x", "kl": [0.0, 1.0], "gold": [0.0], "proxy_score": [0.0]}])


def test_plot_and_write(tmp_path):
  curves = _curves()
  png = oo.plot(curves, tmp_path / "fig.png", title="test")
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  out = tmp_path / "out" / "nested"
  rows = oo.write(curves + [{**curves[2], "proxy": "np", "kl": np.array([0.0]), "gold": np.float64(0.3).reshape(1),
                             "proxy_score": [np.float32(1.0)]}], out)
  assert sorted(p.name for p in out.iterdir()) == ["curves.json", "overoptimization.png", "table.md"]
  back = json.loads((out / "curves.json").read_text())
  assert back[:3] == curves
  assert back[3]["kl"] == [0.0] and back[3]["gold"] == [0.3] and back[3]["proxy_score"] == [1.0]
  assert len(rows) == 4 and (out / "table.md").read_text() == oo.table_markdown(rows)
  assert (out / "overoptimization.png").read_bytes()[:4] == b"\x89PNG"
