"""Test setup: 8 fake CPU devices (set before jax is imported), repo paths, and shared fixtures."""
import os
import sys
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# JAX's persistent compilation cache (it works on CPU): the same small programs are compiled by many tests and
# by the subprocesses of the launcher tests; from the second time on they load in milliseconds.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.environ.get("TMPDIR", "/tmp"), "l2jax-test-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def repo_root() -> Path:
  return ROOT


@pytest.fixture(scope="session")
def data_dir() -> Path:
  return DATA


@pytest.fixture(scope="session")
def llama2_tokenizer_path() -> Path:
  return DATA / "llama2-tokenizer" / "tokenizer.model"
