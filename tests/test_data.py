import json

import pytest
from datasets import Dataset, DatasetDict

from hf_recover import load_recovery_data, prepare_recovery_dataset
from hf_recover.base.constants import IGNORE_INDEX
from hf_recover.base.data import first_blocks, iter_batches, load_text_splits, prepare_eval_splits

DOCS = ["alpha beta gamma delta", "the quick brown fox", "a", "pruning heals with distillation " * 5]


@pytest.fixture
def docs():
    return Dataset.from_dict({"text": DOCS})


def _token_stream(tokenizer, texts):
    return [
        t for text in texts for t in tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ]


def test_packing_concatenates_with_eos_and_cuts_full_blocks(docs, tiny_tokenizer):
    stream = _token_stream(tiny_tokenizer, DOCS)
    packed = prepare_recovery_dataset(docs, tiny_tokenizer, max_length=7)
    n_blocks = len(stream) // 7
    assert len(packed) == n_blocks
    assert [t for row in packed["input_ids"] for t in row] == stream[: n_blocks * 7]
    assert all(len(row) == 7 for row in packed["input_ids"])
    # Every token is a label and every position attends.
    assert packed["labels"] == packed["input_ids"]
    assert all(m == [1] * 7 for m in packed["attention_mask"])
    # One EOS after each document that fits completely, at the document boundary.
    boundaries, position = [], 0
    for text in DOCS:
        position += len(tiny_tokenizer(text, add_special_tokens=False)["input_ids"]) + 1
        boundaries.append(position - 1)
    flat = [t for row in packed["input_ids"] for t in row]
    for b in boundaries:
        if b < len(flat):
            assert flat[b] == tiny_tokenizer.eos_token_id


def test_padding_masks_labels_and_attention(docs, tiny_tokenizer):
    padded = prepare_recovery_dataset(docs, tiny_tokenizer, max_length=12, packing=False)
    assert len(padded) == len(DOCS)
    for text, ids, mask, labels in zip(DOCS, padded["input_ids"], padded["attention_mask"], padded["labels"]):
        doc = (tiny_tokenizer(text, add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id])[:12]
        assert ids[: len(doc)] == doc and len(ids) == 12
        assert mask == [1] * len(doc) + [0] * (12 - len(doc))
        assert labels == doc + [IGNORE_INDEX] * (12 - len(doc))
        assert ids[len(doc) :] == [tiny_tokenizer.pad_token_id] * (12 - len(doc))


def test_preparation_is_deterministic_and_seed_shuffles(docs, tiny_tokenizer):
    a = prepare_recovery_dataset(docs, tiny_tokenizer, max_length=5, seed=3)
    b = prepare_recovery_dataset(docs, tiny_tokenizer, max_length=5, seed=3)
    c = prepare_recovery_dataset(docs, tiny_tokenizer, max_length=5, seed=None)
    assert a["input_ids"] == b["input_ids"]
    assert a["input_ids"] != c["input_ids"]  # the seed reorders documents before packing


def test_dataset_dict_is_prepared_split_by_split(docs, tiny_tokenizer):
    prepared = prepare_recovery_dataset(DatasetDict(train=docs, validation=docs), tiny_tokenizer, max_length=6)
    assert set(prepared) == {"train", "validation"}
    assert prepared["train"]["input_ids"] == prepared["validation"]["input_ids"]


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"max_length": 1}, "max_length must be >= 2"),
        ({"text_column": "body"}, "no column 'body'"),
    ],
)
def test_bad_preparation_input_is_rejected(docs, tiny_tokenizer, kwargs, error):
    with pytest.raises(ValueError, match=error):
        prepare_recovery_dataset(docs, tiny_tokenizer, **kwargs)


def test_empty_dataset_and_too_little_text_are_rejected(tiny_tokenizer):
    with pytest.raises(ValueError, match="empty"):
        prepare_recovery_dataset(Dataset.from_dict({"text": []}), tiny_tokenizer)
    with pytest.raises(ValueError, match="fewer than max_length"):
        prepare_recovery_dataset(Dataset.from_dict({"text": ["short"]}), tiny_tokenizer, max_length=512)


# -- loaders ------------------------------------------------------------------------------------------------


@pytest.fixture
def local_files(tmp_path):
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt" / "a.txt").write_text("first document\nwith two lines")
    (tmp_path / "txt" / "b.txt").write_text("second document")
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps({"body": f"row {i}", "n": i}) for i in range(5)))
    (tmp_path / "data.json").write_text(json.dumps([{"text": f"json {i}"} for i in range(3)]))
    Dataset.from_dict({"text": [f"parquet {i}" for i in range(4)]}).to_parquet(str(tmp_path / "data.parquet"))
    return tmp_path


def test_txt_folder_gives_one_document_per_file(local_files):
    data = load_recovery_data(local_files / "txt")
    assert sorted(data["text"]) == ["first document\nwith two lines", "second document"]
    assert data.column_names == ["text", "source"]


def test_json_jsonl_parquet_loaders(local_files):
    assert load_recovery_data(local_files / "data.jsonl", text_column="body")["text"] == [f"row {i}" for i in range(5)]
    assert load_recovery_data(local_files / "data.json")["text"] == [f"json {i}" for i in range(3)]
    assert load_recovery_data(local_files / "data.parquet")["text"] == [f"parquet {i}" for i in range(4)]


def test_mixture_follows_weights(tmp_path):
    for name in ("a", "b"):
        Dataset.from_dict({"text": [f"{name}{i}" for i in range(2000)]}).to_parquet(str(tmp_path / f"{name}.parquet"))
    mixed = load_recovery_data([tmp_path / "a.parquet", tmp_path / "b.parquet"], weights=[3, 1], seed=0)
    share_a = sum(t.startswith("a") for t in mixed["text"]) / len(mixed)
    assert 0.70 < share_a < 0.80  # 3:1 -> 75%, until the first source runs out
    assert set(mixed["source"]) == {str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")}
    again = load_recovery_data([tmp_path / "a.parquet", tmp_path / "b.parquet"], weights=[3, 1], seed=0)
    assert again["text"] == mixed["text"]


def test_mixture_with_per_source_columns(local_files):
    mixed = load_recovery_data(
        [{"path": local_files / "data.jsonl", "text_column": "body"}, local_files / "data.parquet"], seed=1
    )
    rows = [text for text in mixed["text"] if text.startswith("row ")]
    parquet = [text for text in mixed["text"] if text.startswith("parquet ")]
    assert rows and parquet and len(rows) + len(parquet) == len(mixed)  # both sources, and nothing else
    assert rows == [f"row {i}" for i in range(len(rows))]  # the jsonl source read its own column, `body`, in order
    assert parquet == [f"parquet {i}" for i in range(len(parquet))]
    assert set(mixed["source"]) == {str(local_files / "data.jsonl"), str(local_files / "data.parquet")}


def test_text_splits_hold_out_validation_and_add_ood(tmp_path):
    for folder, count in (("data", 40), ("ood", 3)):
        (tmp_path / folder).mkdir()
        for i in range(count):
            (tmp_path / folder / f"{i:02d}.txt").write_text(f"{folder} document {i}")
    splits = load_text_splits([str(tmp_path / "data")], ood_dataset=str(tmp_path / "ood"), held_out=True, seed=0)
    assert set(splits) == {"train", "validation", "ood"}  # the held-out domains come with the default corpus only
    assert (len(splits["train"]), len(splits["validation"]), len(splits["ood"])) == (38, 2, 3)  # 5% held out
    assert not set(splits["train"]["text"]) & set(splits["validation"]["text"])
    fewer = load_text_splits([str(tmp_path / "data")], max_train_documents=10, seed=0)
    assert len(fewer["train"]) == 10 and set(fewer["train"]["text"]) < set(splits["train"]["text"])
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "only.txt").write_text("a single document")
    with pytest.raises(ValueError, match="fewer than 2 documents"):
        load_text_splits([str(tmp_path / "one")])


def test_first_blocks_and_evaluation_splits(docs, tiny_tokenizer):
    blocks = prepare_recovery_dataset(docs, tiny_tokenizer, max_length=4)
    assert len(blocks) > 3
    assert first_blocks(blocks, 3)["input_ids"] == blocks["input_ids"][:3]
    assert len(first_blocks(blocks, 10_000)) == len(blocks)  # fewer blocks than asked: all of them
    evaluation = prepare_eval_splits({"train": docs, "validation": docs}, tiny_tokenizer, max_length=4, blocks=2)
    assert set(evaluation) == {"validation"}  # never the training text
    assert evaluation["validation"]["input_ids"] == blocks["input_ids"][:2]


def test_loader_bad_input(local_files):
    with pytest.raises(FileNotFoundError, match="No such file"):
        load_recovery_data(local_files / "missing.jsonl")
    with pytest.raises(ValueError, match="no column 'content'"):
        load_recovery_data(local_files / "data.jsonl", text_column="content")
    with pytest.raises(ValueError, match="one weight per source"):
        load_recovery_data([local_files / "data.json", local_files / "data.parquet"], weights=[1])
    with pytest.raises(ValueError, match="'path'"):
        load_recovery_data([{"file": "x"}])


def test_iter_batches_from_dataset_rows_and_dataloader(docs, tiny_tokenizer):
    import torch

    packed = prepare_recovery_dataset(docs, tiny_tokenizer, max_length=4)
    batches = list(iter_batches(packed, batch_size=3))
    assert [b["input_ids"].shape[0] for b in batches] == [3] * (len(packed) // 3) + (
        [len(packed) % 3] if len(packed) % 3 else []
    )
    assert torch.equal(torch.cat([b["input_ids"] for b in batches]), torch.tensor(packed["input_ids"]))
    assert len(list(iter_batches(packed, batch_size=1, max_batches=2))) == 2
    loader = torch.utils.data.DataLoader(packed.with_format("torch"), batch_size=2)
    assert torch.equal(next(iter(iter_batches(loader)))["input_ids"], torch.tensor(packed["input_ids"][:2]))


def test_rows_of_different_lengths_are_padded_and_masked_per_batch(tiny_llama):
    """Chat examples in calibration or evaluation data: every batch is padded to its longest row, the padding masked,
    so a batched pass gives what the rows give one at a time."""
    import torch

    from hf_recover.base.evaluation import evaluate_perplexity
    from hf_recover.prune import prune_depth

    rows = [{"input_ids": list(range(3, 3 + n)), "labels": list(range(3, 3 + n))} for n in (5, 9, 7, 12)]
    batch = next(iter_batches(rows, batch_size=4))
    assert batch["input_ids"].shape == (4, 12) and batch["attention_mask"].sum(1).tolist() == [5, 9, 7, 12]
    assert (batch["labels"][0, 5:] == IGNORE_INDEX).all() and (batch["attention_mask"][0, 5:] == 0).all()
    batched = evaluate_perplexity(tiny_llama, rows, batch_size=4)["perplexity"]
    alone = evaluate_perplexity(tiny_llama, rows, batch_size=1)["perplexity"]
    assert batched == pytest.approx(alone, rel=1e-4)
    a, _ = prune_depth(tiny_llama, remove=[2, 3], data=rows, heal="lstsq", batch_size=4)
    b, _ = prune_depth(tiny_llama, remove=[2, 3], data=rows, heal="lstsq", batch_size=1)
    torch.testing.assert_close(a.model.layers[1].mlp.down_proj.weight, b.model.layers[1].mlp.down_proj.weight)
