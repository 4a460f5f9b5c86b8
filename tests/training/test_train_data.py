"""GLUE loaders on the real files, their error messages, the token cache and batching."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model.hf import backbone_dir, load_tokenizer
from training import data as D


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(backbone_dir("minilm-l6"))


def _data_dir() -> Path:
    return D.default_data_dir()


def test_real_sst2_rte_mrpc_load():
    sst2 = D.read_examples(D.split_path(_data_dir(), "sst2", "dev"), "sst2")
    assert len(sst2) == 872 and sst2[0].texts == ("one long string of cliches .",) and sst2[0].label == 0
    rte = D.read_examples(D.split_path(_data_dir(), "rte", "dev"), "rte")
    assert len(rte) == 277 and len(rte[0].texts) == 2 and {e.label for e in rte} == {0, 1}
    mrpc = D.read_examples(D.split_path(_data_dir(), "mrpc", "dev"), "mrpc")
    assert len(mrpc) == 408 and mrpc[0].texts[0].startswith("The dollar was at 116.92 yen")


def test_glue_layouts_and_bom(tmp_path):
    # MRPC in MSR format with a byte-order mark; RTE in GLUE's own layout with label names
    (tmp_path / "MRPC").mkdir()
    (tmp_path / "MRPC" / "train.tsv").write_text(
        "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\tA cat.\tA feline.\n", encoding="utf-8"
    )
    assert D.read_examples(tmp_path / "MRPC" / "train.tsv", "mrpc")[0] == D.Example(
        ("A cat.", "A feline."), 1
    )
    (tmp_path / "RTE").mkdir()
    (tmp_path / "RTE" / "dev.tsv").write_text("index\tsentence1\tsentence2\tlabel\n0\tA\tB\tnot_entailment\n")
    assert D.read_examples(tmp_path / "RTE" / "dev.tsv", "rte")[0].label == 1
    # CoLA has no header: source, label, original label, sentence
    (tmp_path / "CoLA").mkdir()
    (tmp_path / "CoLA" / "dev.tsv").write_text("gj04\t1\t\tThe sailors rode the breeze clear of the rocks.\n")
    assert D.read_examples(tmp_path / "CoLA" / "dev.tsv", "cola")[0].label == 1
    (tmp_path / "STS-B").mkdir()
    (tmp_path / "STS-B" / "dev.tsv").write_text(
        "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
        "0\tmain\tx\t2012\t1\tnone\tnone\tA man.\tA person.\t4.250\n"
    )
    ex = D.read_examples(tmp_path / "STS-B" / "dev.tsv", "stsb")[0]
    assert ex.texts == ("A man.", "A person.") and ex.label == pytest.approx(4.25)


def test_errors_name_file_and_line(tmp_path):
    with pytest.raises(D.DataError, match=r"nowhere.*SST-2.*dev\.tsv: missing"):
        D.load_split(tmp_path / "nowhere", "sst2", "dev")
    bad = tmp_path / "dev.tsv"
    bad.write_text("sentence\tlabel\ngood film\t1\nbad film\t7\n")
    with pytest.raises(D.DataError, match=r"dev\.tsv:3: unknown label '7'"):
        D.read_examples(bad, "sst2")
    bad.write_text("sentence\tlabel\ngood film\t1\nno label here\n")
    with pytest.raises(D.DataError, match=r"dev\.tsv:3: expected at least 2 tab-separated fields, got 1"):
        D.read_examples(bad, "sst2")
    bad.write_text("text\tlabel\ngood\t1\n")
    with pytest.raises(D.DataError, match=r"dev\.tsv:1: header lacks column\(s\) \['sentence'\]"):
        D.read_examples(bad, "sst2")
    with pytest.raises(ValueError, match="unknown task 'sst3'"):
        D.task_spec("sst3")


def test_token_cache_roundtrip(tmp_path, tokenizer):
    kw = dict(limit=50, seed=1, cache_dir=tmp_path)
    a = D.load_encoded(_data_dir(), "rte", "dev", tokenizer, 64, **kw)
    files = list(tmp_path.glob("rte-dev-*.safetensors"))
    assert len(files) == 1
    b = D.load_encoded(_data_dir(), "rte", "dev", tokenizer, 64, **kw)  # from the cache
    assert len(a) == len(b) == 50
    assert all(np.array_equal(x, y) for x, y in zip(a.input_ids, b.input_ids, strict=True))
    assert all(np.array_equal(x, y) for x, y in zip(a.token_type_ids, b.token_type_ids, strict=True))
    assert np.array_equal(a.labels, b.labels)
    assert max(a.lengths()) <= 64 and set(np.concatenate(a.token_type_ids).tolist()) == {0, 1}  # pairs
    # another max length is another cache entry
    D.load_encoded(_data_dir(), "rte", "dev", tokenizer, 32, **kw)
    assert len(list(tmp_path.glob("rte-dev-*.safetensors"))) == 2


def test_writers_caching_the_same_data_at_once_do_not_collide(tmp_path, tokenizer):
    """The ranks of a torchrun job cache the same encoded data at once: each writes its own
    temporary file and renames it into place, so none loses its file to another's rename."""
    import threading

    enc = D.load_encoded(_data_dir(), "rte", "dev", tokenizer, 64, limit=20, seed=1)
    path = tmp_path / "rte-dev-x.safetensors"
    errors: list[BaseException] = []

    def write() -> None:
        try:
            for _ in range(30):
                D._save_encoded(enc, path)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=write) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind
    back = D._load_encoded(path)
    assert all(np.array_equal(x, y) for x, y in zip(back.input_ids, enc.input_ids, strict=True))


def test_bucketed_batches_and_dynamic_padding(tokenizer):
    enc = D.load_encoded(_data_dir(), "sst2", "dev", tokenizer, 64, limit=200)
    batches = D.bucketed_batches(enc.lengths(), 16, shuffle=True, seed=0, bucket_batches=4)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(200))  # every example exactly once
    spread = [np.ptp(enc.lengths()[b]) for b in batches]
    random_spread = [
        np.ptp(enc.lengths()[b]) for b in np.array_split(np.random.default_rng(0).permutation(200), 13)
    ]
    assert np.mean(spread) < np.mean(random_spread)  # buckets group similar lengths
    b = D.collate(enc, batches[0])
    T = max(len(enc.input_ids[i]) for i in batches[0])
    assert b["input_ids"].shape == (len(batches[0]), T)
    assert b["attention_mask"].sum().item() == sum(len(enc.input_ids[i]) for i in batches[0])
    assert b["input_ids"][b["attention_mask"] == 0].eq(0).all()
    assert b["index"].tolist() == list(batches[0]) and "augmented" not in b


def test_augmented_texts_are_marked_and_can_be_left_out(tokenizer, tmp_path):
    from training.tasks import GlueData

    data = GlueData("sst2", tokenizer, _data_dir(), 64, train_examples=20, dev_examples=8, cache_dir=tmp_path)
    originals = data.originals()
    assert originals is data  # nothing augmented yet
    extra = [D.Example(("a bad film",), 1), D.Example(("a dull film",), 1)]
    data.add_train_texts(extra, tokenizer, 64)
    assert data.num_train == 22 and data.train.augmented.tolist() == [False] * 20 + [True] * 2
    b = D.collate(data.train, [0, 20, 21])
    assert b["augmented"].tolist() == [False, True, True] and b["index"].tolist() == [0, 20, 21]
    plain = data.originals()
    assert plain.num_train == 20 and plain.train.augmented is None
    assert [x.tolist() for x in plain.train.input_ids] == [x.tolist() for x in data.train.input_ids[:20]]
    assert data.num_train == 22  # the view leaves the data as it was
