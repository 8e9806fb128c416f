"""Document sources: text / JSONL / TFDS read right; bad records, missing files and empty datasets give clear errors."""
import json
import pickle
import sys

import numpy as np
import pytest

from l2jax.data.sources import DataError, JsonlSource, SourceSpec, TextSource, TfdsSource, open_source
from l2jax.data.tokenizer import Tokenizer

tfds = pytest.importorskip("tensorflow_datasets")


class L2jaxTinyText(tfds.core.GeneratorBasedBuilder):
  """A 5 + 2 document text dataset written as array_record in the test's tmp dir (registered as l2jax_tiny_text)."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {"text": tfds.features.Text(), "n": np.int64}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(5), "test": self._generate_examples(2)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {"text": f"document {i}: héllo wörld", "n": i}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("tfds")
  L2jaxTinyText(data_dir=str(d), file_format="array_record").download_and_prepare()
  return d


def write(path, text: str):
  path.write_text(text, encoding="utf-8")
  return path


def test_text_paragraph_line_file(tmp_path):
  a = write(tmp_path / "a.txt", "First para\nsecond line\n\n  \nSecond para\r\n\n\n\nThird\n")
  b = write(tmp_path / "b.txt", "Only one")
  para = TextSource([a, b])
  assert [para[i] for i in range(len(para))] == ["First para\nsecond line", "Second para", "Third", "Only one"]
  line = TextSource([a, b], split="line")
  assert [line[i] for i in range(len(line))] == ["First para", "second line", "Second para", "Third", "Only one"]
  whole = TextSource(str(tmp_path / "*.txt"), split="file")  # a glob, sorted
  assert len(whole) == 2 and whole[1] == "Only one" and whole[0].startswith("First para\n")
  with pytest.raises(IndexError):
    para[4]
  with pytest.raises(ValueError, match="paragraph"):
    TextSource(a, split="sentence")


def test_text_real_file_and_pickle(data_dir):
  src = TextSource(data_dir / "pretrain-text" / "tinyshakespeare.txt")
  assert len(src) > 7000
  assert src[0] == "First Citizen:\nBefore we proceed any further, hear me speak."
  again = pickle.loads(pickle.dumps(src))  # grain worker processes receive sources pickled
  assert again[len(src) - 1] == src[len(src) - 1]


def test_text_bad_utf8_names_line(tmp_path):
  p = tmp_path / "bad.txt"
  p.write_bytes(b"fine\nfine too\nbroken \xff here\n")
  with pytest.raises(DataError, match=rf"{p}:3: not valid UTF-8"):
    TextSource(p)


def test_jsonl_reads_field(data_dir, tmp_path):
  path = data_dir / "pretrain-text" / "c4_demo.jsonl"
  src = JsonlSource(path)
  lines = path.read_text(encoding="utf-8").splitlines()
  assert len(src) == len(lines) == 300
  assert src[0] == json.loads(lines[0])["text"] and src[299] == json.loads(lines[299])["text"]
  p = write(tmp_path / "f.jsonl", '{"body": "x\\ny", "text": 3}\n\n{"body": "\\u00e9"}\n')
  assert [JsonlSource(p, field="body")[i] for i in range(2)] == ["x\ny", "é"]


@pytest.mark.parametrize("line, problem", [
    ('{"text": "ok"', "invalid JSON"),
    ('["text"]', "expected a JSON object, found list"),
    ('{"body": "no text"}', "missing field 'text'"),
    ('{"text": null}', "field 'text' is NoneType, expected a string"),
])
def test_jsonl_bad_line_names_file_line(tmp_path, line, problem):
  p = write(tmp_path / "d.jsonl", '{"text": "a"}\n{"text": "b"}\n' + line + '\n{"text": "c"}\n')
  with pytest.raises(DataError) as e:
    JsonlSource(p)
  assert f"{p}:3: " in str(e.value) and problem in str(e.value)


def test_jsonl_skip_bad_counts(tmp_path):
  p = write(tmp_path / "d.jsonl", '{"text": "a"}\nnot json\n{"x": 1}\n{"text": "b"}\n{oops\n')
  src = JsonlSource(p, skip_bad=True)
  assert [src[i] for i in range(len(src))] == ["a", "b"]
  assert src.num_skipped == 3
  assert sum(v for k, v in src.skipped.items() if k.startswith("invalid JSON")) == 2
  assert src.skipped_examples[0].startswith(f"{p}:2: invalid JSON")


def test_missing_file_names_path(tmp_path):
  missing = tmp_path / "nope.txt"
  for make in (lambda: TextSource(missing), lambda: JsonlSource([missing]),
               lambda: open_source({"kind": "text", "paths": [str(missing)]})):
    with pytest.raises(FileNotFoundError, match=str(missing)):
      make()
  with pytest.raises(FileNotFoundError, match="no file matches"):
    TextSource(str(tmp_path / "*.txt"))


def test_empty_dataset_says_which(tmp_path):
  blank = write(tmp_path / "blank.txt", "\n  \n\n")
  with pytest.raises(DataError, match=rf"text source {blank}: no documents"):
    TextSource(blank)
  allbad = write(tmp_path / "bad.jsonl", "nope\n")
  with pytest.raises(DataError, match=rf"JSONL source {allbad}: no documents"):
    JsonlSource(allbad, skip_bad=True)


def test_tfds_source_without_tensorflow(tfds_dir):
  src = TfdsSource("l2jax_tiny_text", split="train", data_dir=tfds_dir)
  assert len(src) == 5
  assert sorted(src[i] for i in range(5)) == [f"document {i}: héllo wörld" for i in range(5)]
  assert "tensorflow" not in sys.modules  # tfds.data_source + array_record run without TensorFlow
  test = open_source({"kind": "tfds", "name": "l2jax_tiny_text", "split": "test", "data_dir": str(tfds_dir)})
  assert len(test) == 2 and isinstance(test[0], str)
  assert pickle.loads(pickle.dumps(src))[0] == src[0]
  import grain
  assert len(list(grain.MapDataset.source(src).to_iter_dataset())) == 5


def test_tfds_errors(tfds_dir, tmp_path):
  with pytest.raises(FileNotFoundError, match="not found"):
    TfdsSource("l2jax_no_such_dataset", data_dir=tfds_dir)
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "none")):
    TfdsSource("l2jax_tiny_text", data_dir=tmp_path / "none")
  with pytest.raises(DataError, match="Unknown split"):
    TfdsSource("l2jax_tiny_text", split="validation", data_dir=tfds_dir)
  with pytest.raises(DataError, match="no feature 'body'"):
    TfdsSource("l2jax_tiny_text", data_dir=tfds_dir, field="body")
  with pytest.raises(DataError, match="empty dataset"):
    TfdsSource("l2jax_tiny_text", split="train[:0]", data_dir=tfds_dir)


def test_open_source_specs(data_dir):
  path = str(data_dir / "pretrain-text" / "c4_demo.jsonl")
  assert len(open_source(SourceSpec(kind="jsonl", paths=(path,)))) == 300
  assert len(open_source({"kind": "jsonl", "paths": path})) == 300
  assert open_source({"kind": "text", "paths": [path], "split": "line"})[0].startswith('{"text"')
  with pytest.raises(ValueError, match="valid keys"):
    open_source({"kind": "text", "path": path})
  with pytest.raises(ValueError, match="kind must be one of"):
    open_source({"kind": "csv", "paths": [path]})
  with pytest.raises(ValueError, match="needs paths"):
    open_source({"kind": "text"})


def test_unreadable_tokenizer(tmp_path):
  garbage = tmp_path / "tokenizer.model"
  garbage.write_bytes(b"this is not a sentencepiece model" * 10)
  with pytest.raises(ValueError, match=rf"{garbage}: not a readable SentencePiece model"):
    Tokenizer(garbage)
  with pytest.raises(FileNotFoundError, match="tokenizer model not found"):
    Tokenizer(tmp_path / "missing.model")
