"""Calibration sources and seeded windows (local files; Hub sources checked without network)."""
import json

import pytest
import torch

from llmprune.calibration import data
from llmprune.errors import UserError
from tiny_models import tiny_tokenizer


def test_local_sources_read_the_same_text(tmp_path):
    docs = ["first document text", "second one", "third"]
    (tmp_path / "a.txt").write_text("\n\n".join(docs))
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs, "id": [1, 2, 3]}), tmp_path / "a.parquet")
    assert data.load_texts(str(tmp_path / "a.jsonl")) == docs
    assert data.load_texts(str(tmp_path / "a.parquet")) == docs
    assert data.load_texts(str(tmp_path / "a.txt")) == ["\n\n".join(docs)]


@pytest.mark.parametrize("content,expected", [("{bad json", "not valid JSON"), ('{"body": "x"}', "field 'text'")])
def test_bad_jsonl_is_a_clear_error(tmp_path, content, expected):
    (tmp_path / "b.jsonl").write_text(content)
    with pytest.raises(UserError, match=expected):
        data.load_texts(str(tmp_path / "b.jsonl"))


def test_parquet_without_text_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "c.parquet")
    with pytest.raises(UserError, match="no column 'text'"):
        data.load_texts(str(tmp_path / "c.parquet"))


def test_hub_sources_request_the_reference_datasets(monkeypatch):
    calls = []

    def fake_load_dataset(repo, name=None, split=None, data_files=None):
        calls.append((repo, name, split, data_files))
        return {"text": ["hello world"]}

    import datasets

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert data.load_texts("c4") == ["hello world"]
    assert data.load_texts("wikitext2", split="test") == ["hello world"]
    assert calls[0] == ("allenai/c4", None, "train", {"train": "en/c4-train.00000-of-01024.json.gz"})
    assert calls[1] == ("Salesforce/wikitext", "wikitext-2-raw-v1", "test", None)


def test_hub_failure_is_one_line(monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(UserError, match="offline"):
        data.load_texts("c4")


def test_stdlib_split_is_disjoint_and_stable():
    train, test = data.stdlib_files("train"), data.stdlib_files("test")
    assert train and test and not set(train) & set(test)
    assert 0.03 < len(test) / (len(train) + len(test)) < 0.2


def test_windows_are_seeded_and_sized():
    tok = tiny_tokenizer()
    texts = data.stdlib_texts("test")[:3]
    a = data.calibration_windows(tok, texts, 5, 40, seed=1)
    b = data.calibration_windows(tok, texts, 5, 40, seed=1)
    c = data.calibration_windows(tok, texts, 5, 40, seed=2)
    assert a.shape == (5, 40) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_too_little_text():
    with pytest.raises(UserError, match="only"):
        data.calibration_windows(tiny_tokenizer(), ["tiny"], 4, 64)
