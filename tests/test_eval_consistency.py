"""python -m l2jax.eval.consistency (Llama 2 Table 30): bad arguments end in one line, before any model is loaded."""
from l2jax.data import gatt as gd
from l2jax.eval import consistency


def test_unknown_kind_is_one_line_listing_the_kinds(tmp_path, capsys):
  model = tmp_path / "model"
  model.mkdir()
  (model / "config.json").write_text("{}")
  rc = consistency.main(["--ckpt", str(model), "--kinds", "start_word,bogus", "--out", str(tmp_path / "out")])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and "\n" not in err, err
  assert err.startswith("error: --kinds: unknown constraint kind 'bogus'; choose from ")
  assert all(k in err for k in gd.KINDS)
  assert not (tmp_path / "out").exists()


def test_missing_checkpoint_is_one_line(tmp_path, capsys):
  rc = consistency.main(["--ckpt", str(tmp_path / "nope"), "--out", str(tmp_path / "out")])
  err = capsys.readouterr().err.strip()
  assert rc == 2 and err == f"error: --ckpt {tmp_path / 'nope'}: not an l2jax checkpoint directory (no config.json)"
