"""Ahead-of-time compilation for TPU slices (l2jax.aot) with the real TPU compiler (libtpu, the `tpu` extra): the
accelerator names, the collective counts of optimized HLO, and stages compiled for v5e-8 / v5p-8 from abstract
shapes; a program that cannot fit gets the one-line exit-1 message."""
import json
import os
import subprocess
import sys

import pytest

from l2jax import aot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_accelerator_names_map_to_topologies_and_hbm():
  a = aot.parse_accelerator("v5p-128")
  assert (a.generation, a.chips, a.topology, a.hbm_gib) == ("v5p", 64, "v5p:4x4x4", 95)
  assert aot.parse_accelerator("v4-32").topology == "v4:2x2x4" and aot.parse_accelerator("v4-32").hbm_gib == 32
  assert aot.parse_accelerator("v5e-256").topology == "v5e:16x16" and aot.parse_accelerator("v5e-256").hbm_gib == 16
  assert aot.parse_accelerator("v5litepod-8") == aot.Accelerator("v5litepod-8", "v5e", 8, "v5e:2x4", 16 * aot.GiB,
                                                                "default")
  assert aot.parse_accelerator("v6e-64").topology == "v6e:8x8" and aot.parse_accelerator("v6e-64").hbm_gib == 32
  assert aot.parse_accelerator("v5p-8").topology == "v5p:2x2x1"
  for bad in ("v5p-7", "v7-8", "tpu", "v5e-3"):
    with pytest.raises(aot.AotError, match="known: v4-N"):
      aot.parse_accelerator(bad)


def test_collectives_counted_from_hlo_text():
  hlo = "\n".join([
      "  %ag = bf16[8,128]{1,0} all-gather(bf16[1,128]{1,0} %p), replica_groups={}",
      "  %ags = (f32[4]{0}, f32[32]{0}) all-gather-start(f32[4]{0} %x)",
      "  %agd = f32[32]{0} all-gather-done((f32[4]{0}, f32[32]{0}) %ags)",
      "  %ar = f32[16,16]{1,0} all-reduce(f32[16,16]{1,0} %g), to_apply=%add",
      "  %rs = f32[2,16]{1,0} reduce-scatter(f32[16,16]{1,0} %g), dimensions={0}",
      "  %add = f32[] add(f32[] %a, f32[] %b)",
  ])
  c = aot.collectives(hlo)
  assert c["all-gather"] == {"count": 2, "bytes": 8 * 128 * 2 + 32 * 4}
  assert c["all-reduce"] == {"count": 1, "bytes": 16 * 16 * 4}
  assert c["reduce-scatter"] == {"count": 1, "bytes": 2 * 16 * 4}
  assert c["all-to-all"]["count"] == 0


def _aot(*args, expect=0):
  pytest.importorskip("libtpu")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  r = subprocess.run([sys.executable, "-m", "l2jax.aot", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == expect, r.stdout + r.stderr
  return r


@pytest.mark.slow
def test_compile_pretrain_and_reward_for_tpu_slices(tmp_path):
  r = _aot("experiments/pretrain.py:test", "v5e-8", "--run-dir", str(tmp_path))
  report = json.loads((tmp_path / "aot.json").read_text())
  assert report["chips"] == 8 and report["mesh"]["fsdp"] == 8
  rows = {p["program"]: p for p in report["programs"]}
  assert set(rows) == {"train_step", "eval_step"}
  for p in rows.values():
    assert 0 < p["peak"] < 16 * aot.GiB and p["arguments"] > 0 and p["live"] == p["peak"] + p["resident"]
  # while the evaluation pass runs, the optimizer's moments stay in HBM; the train step holds everything itself
  assert 0 < rows["eval_step"]["resident"] < rows["train_step"]["arguments"]
  assert rows["train_step"]["resident"] == 0
  # fully sharded data parallelism: the train step gathers weights and reduces gradients across the slice
  assert rows["train_step"]["collectives"]["all-gather"]["count"] > 0
  assert "train_step" in r.stdout and "fits" in r.stdout
  assert sorted(os.listdir(tmp_path)) == ["aot.json"]    # writes nothing else
  r = _aot("experiments/rm_helpful.py:test", "v5p-8", "--slices", "2")
  assert "2 x v5p-8" in r.stdout and "'dcn': 2" in r.stdout and "score_step" in r.stdout


@pytest.mark.slow
def test_program_that_does_not_fit_exits_1_naming_it():
  # 4096 rows x 256 tokens of the tiny model: the float32 logits alone are 16 GiB per v5e chip
  r = _aot("experiments/pretrain.py:tiny", "v5e-8", "--set", "global_batch=4096", "--set", "seq_len=256",
           expect=1)
  err = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert len(err) >= 1 and "train_step does not fit on v5e-8" in err[0] and "GiB HBM" in err[0]
  assert "micro_batch" in err[0] and "Traceback" not in r.stderr


@pytest.mark.slow
def test_ppo_rejection_and_dpo_programs_through_the_launcher(tmp_path):
  pytest.importorskip("libtpu")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "L2JAX_RUNS": str(tmp_path / "runs")}
  for exp, acc, sets, progs in (("experiments/ppo.py:test", "v5e-8", [], {"generate", "score", "update"}),
                                ("experiments/rejection.py:test", "v5p-8", ["--set", "global_batch=4"],
                                 {"generate", "train_step"}),
                                ("experiments/dpo.py:test", "v5e-8", [], {"train_step", "eval_logps"})):
    out = tmp_path / exp.split("/")[1].replace(".py:", "-")
    r = subprocess.run([sys.executable, "-m", "l2jax.launch", exp, "--aot", acc, "--run-dir", str(out), *sets],
                       cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = json.loads((out / "aot.json").read_text())["programs"]
    assert {p["program"] for p in rows} == progs and all(0 < p["peak"] < 16 * aot.GiB for p in rows)
    assert sorted(os.listdir(out)) == ["aot.json"]
  assert not (tmp_path / "runs").exists()   # no dependency was built: abstract shapes only


@pytest.mark.slow
def test_splash_attention_compiles_for_v5e_and_v5p_and_xla_is_the_fallback(tmp_path):
  # 128 tokens tile: training and evaluation run the Pallas (Mosaic) kernel; attention_impl=xla has none
  for acc, impl, kernels in (("v5e-8", None, True), ("v5p-8", None, True), ("v5e-8", "xla", False)):
    out = tmp_path / f"{acc}-{impl}"
    args = ["experiments/pretrain.py:test", acc, "--run-dir", str(out), "--set", "seq_len=128", "--set",
            "model.max_seq_len=128"] + (["--set", f"model.attention_impl={impl}"] if impl else [])
    _aot(*args)
    rows = json.loads((out / "aot.json").read_text())["programs"]
    assert all((r["tpu_kernels"] > 0) == kernels for r in rows), rows


def test_a_batch_that_does_not_split_over_the_slice_is_one_line():
  pytest.importorskip("libtpu")
  r = subprocess.run([sys.executable, "-m", "l2jax.launch", "experiments/rejection.py:test", "--aot", "v5p-8"],
                     cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 2 and "do not split over the 4 batch shards" in r.stderr and "Traceback" not in r.stderr


def test_unknown_accelerator_is_one_line():
  r = subprocess.run([sys.executable, "-m", "l2jax.aot", "experiments/pretrain.py:test", "v9-8"], cwd=ROOT,
                     capture_output=True, text=True, timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "unknown TPU accelerator 'v9-8'" in r.stderr


def test_the_tpu_extra_is_silent_on_a_machine_without_tpu():
  pytest.importorskip("libtpu")
  if any(os.path.exists(p) for p in ("/dev/accel0", "/dev/vfio/0")):
    pytest.skip("a TPU host")
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_PLATFORMS", "TPU_"))}
  r = subprocess.run([sys.executable, "-c", "import l2jax, jax; print(jax.devices()[0].platform)"], cwd=ROOT,
                     env=env, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0 and r.stdout.strip() == "cpu" and r.stderr == "", r.stderr[:500]
