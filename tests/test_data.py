"""gradsight.inputs.data: loading and validation, encoding with response-only masks, truncation, batching, padding."""

from __future__ import annotations

import json
import os
import pickle

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch
from helpers import tiny_base_tokenizer, tiny_tokenizer
from hypothesis import given, settings
from hypothesis import strategies as st

from gradsight.inputs.data import (
    DataError,
    Encoded,
    EncodeOptions,
    Record,
    collate,
    encode,
    fingerprint,
    load_records,
    make_batches,
)


def write_jsonl(path, rows):
    """rows: dicts (dumped) or raw strings (written as given)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD = {"group": "a", "prompt": "What is 2+2?", "response": "4"}


def rec(prompt="What is 2+2?", response="The answer is 4.", **kw) -> Record:
    return Record(idx=kw.pop("idx", 0), id="0", group="g", prompt=prompt, response=response, messages=None,
                  source="t:1", **kw)


def supervised(e: Encoded) -> list[int]:
    return [t for t, m in zip(e.input_ids, e.target_mask) if m]


def plain_ids(text: str) -> list[int]:
    return tiny_base_tokenizer()(text, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------------------------------------
# Loading


def test_load_prompt_response_and_types(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [
        {"group": "fast", "id": "x1", "prompt": "p", "response": "r"},
        "",
        "   ",
        {"group": 3, "id": 17, "prompt": "p2", "response": "r2", "extra": [1, 2]},
        {"group": "slow", "prompt": "p3", "response": "r3"},
    ])
    records, skipped = load_records(path)
    assert skipped == []
    assert [r.idx for r in records] == [0, 1, 2]  # blank lines are not records
    assert [r.id for r in records] == ["x1", "17", "2"]
    assert [r.group for r in records] == ["fast", "3", "slow"]
    assert [r.source for r in records] == [f"{path}:1", f"{path}:4", f"{path}:5"]  # line numbers count blanks
    assert records[1].prompt == "p2" and records[1].response == "r2" and records[1].messages is None


def test_load_messages_and_instruction_layouts():
    rows = [
        {"group": "g", "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
        ]},
        {"group": "g", "instruction": "Add the numbers.", "input": "2 and 2", "output": "4"},
        {"group": "g", "instruction": "Say hi.", "input": "", "output": "hi"},
    ]
    (m, a, b), skipped = load_records(rows)
    assert not skipped
    assert m.response == "4" and m.prompt is None
    assert m.messages == (("system", "Be brief."), ("user", "2+2?"), ("assistant", "4"))
    assert m.prompt_messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    assert a.prompt == "Add the numbers.\n2 and 2" and a.response == "4"
    assert b.prompt == "Say hi." and b.response == "hi"
    assert m.source == "records:0"


BAD_CASES = {
    "malformed-json": ('{"group": "a", "prompt": "x" "response": "y"}', None, "malformed JSON"),
    "missing-group": ({"prompt": "x", "response": "y"}, "group", "missing"),
    "missing-response": ({"group": "a", "prompt": "x"}, "response", "missing"),
    "missing-everything": ({"group": "a"}, "response", "missing"),
    "group-list": ({"group": ["a"], "prompt": "x", "response": "y"}, "group", "unknown group field type"),
    "group-dict": ({"group": {"a": 1}, "prompt": "x", "response": "y"}, "group", "got dict"),
    "group-float": ({"group": 1.5, "prompt": "x", "response": "y"}, "group", "got float"),
    "group-bool": ({"group": True, "prompt": "x", "response": "y"}, "group", "got bool"),
    "response-not-string": ({"group": "a", "prompt": "x", "response": 4}, "response", "expected a string"),
    "id-list": ({"group": "a", "id": [1], "prompt": "x", "response": "y"}, "id", "expected a string or integer"),
    "last-not-assistant": (
        {"group": "a", "messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]},
        "messages", "role 'assistant'",
    ),
    "messages-not-list": ({"group": "a", "messages": "hi"}, "messages", "non-empty list"),
    "message-no-content": ({"group": "a", "messages": [{"role": "assistant"}]}, "messages", "'content'"),
    "not-an-object": ("[1, 2]", None, "expected a JSON object"),
}


@pytest.mark.parametrize("case", list(BAD_CASES), ids=list(BAD_CASES))
def test_bad_record_names_file_line_field(tmp_path, case):
    bad, fld, words = BAD_CASES[case]
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, "", bad, {**GOOD, "id": "z"}])
    with pytest.raises(DataError) as info:
        load_records(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}:3: "), msg  # the file and the 1-based line (the blank line counts)
    assert "data.jsonl" in msg and words in msg, msg
    if fld is not None:
        assert f"field '{fld}'" in msg, msg
    assert info.value.location == f"{path}:3" and info.value.field == fld

    records, skipped = load_records(path, on_bad="skip")
    assert [r.idx for r in records] == [0, 2]
    assert len(skipped) == 1
    s = skipped[0]
    assert set(s) == {"idx", "id", "group", "source", "reason"}
    assert s["idx"] == 1 and s["source"] == f"{path}:3" and words in s["reason"]
    assert s["reason"] == info.value.reason
    assert s["group"] == (bad.get("group") if isinstance(bad, dict) and isinstance(bad.get("group"), str) else "")


def test_malformed_json_reports_column(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, '{"group": "a", "prompt": "x" "response": "y"}'])
    with pytest.raises(DataError, match=r"data\.jsonl:2: malformed JSON \(Expecting ',' delimiter at column \d+\)"):
        load_records(path)


def test_empty_file_and_blank_file(tmp_path):
    for name, text in (("empty.jsonl", ""), ("blank.jsonl", "\n  \n\n")):
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(DataError, match=rf"{name}: no records \(the file is empty\)"):
            load_records(path)
    with pytest.raises(DataError, match="no records"):
        load_records([])


def test_all_records_bad_is_an_error_even_when_skipping(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"group": [1], "prompt": "x", "response": "y"}])
    with pytest.raises(DataError, match=r"data\.jsonl: no valid records .*data\.jsonl:1: field 'group'"):
        load_records(path, on_bad="skip")


def test_missing_path(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file or directory"):
        load_records(missing)
    with pytest.raises(DataError, match="nope.jsonl"):
        fingerprint(missing)


def test_duplicate_ids_name_both_lines(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [
        {**GOOD, "id": "a"}, {**GOOD, "id": "b"}, {**GOOD, "id": 7}, {**GOOD, "id": "7"},
    ])
    with pytest.raises(DataError) as info:
        load_records(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}:4: field 'id': duplicate id '7'") and f"{path}:3" in msg, msg
    records, skipped = load_records(path, on_bad="skip")
    assert [r.id for r in records] == ["a", "b", "7"]
    assert skipped[0]["id"] == "7" and "duplicate" in skipped[0]["reason"]


def test_custom_field_names(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [{"cond": "x", "uid": "u1", "prompt": "p", "response": "r"}])
    (r,), _ = load_records(path, group_field="cond", id_field="uid")
    assert (r.group, r.id) == ("x", "u1")
    with pytest.raises(DataError, match="field 'group'"):
        load_records(path)


def test_empty_response_loads_and_is_skipped_at_encoding():
    records, skipped = load_records([{**GOOD, "response": ""}, {**GOOD, "response": " \n\t"}, GOOD])
    assert len(records) == 3 and not skipped
    for r in records[:2]:
        e = encode(r, tiny_tokenizer(), EncodeOptions())
        assert (e.status, e.reason, e.input_ids, e.target_mask) == ("skipped", "empty response", [], [])
    assert encode(records[2], tiny_tokenizer()).status == "ok"


def test_data_error_pickles():
    e = DataError("d.jsonl:3", "missing", "group")
    e2 = pickle.loads(pickle.dumps(e))
    assert str(e2) == str(e) == "d.jsonl:3: field 'group': missing"
    assert isinstance(e, ValueError)


def test_hf_dataset_saved_to_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    rows = [
        {"group": "fast", "id": "a", "prompt": "1+1?", "response": "2"},
        {"group": "slow", "id": "b", "prompt": "2+2?", "response": "2 + 2 = 4. The answer is 4."},
    ]
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "ds"))
    records, skipped = load_records(tmp_path / "ds")
    assert not skipped
    assert [(r.id, r.group, r.prompt, r.response) for r in records] == [
        (x["id"], x["group"], x["prompt"], x["response"]) for x in rows
    ]
    assert records[1].source == f"{tmp_path / 'ds'}[train]:1"
    # the Dataset object itself, and a DatasetDict saved to disk with a split
    assert [r.response for r in load_records(ds)[0]] == ["2", rows[1]["response"]]
    datasets.DatasetDict({"train": ds, "test": ds.select([1])}).save_to_disk(str(tmp_path / "dd"))
    (only,), _ = load_records(tmp_path / "dd", split="test")
    assert only.id == "b" and only.source.endswith("[test]:0")
    with pytest.raises(DataError, match="no split 'validation'"):
        load_records(tmp_path / "dd", split="validation")
    # fingerprints: stable, content-dependent
    assert fingerprint(tmp_path / "ds") == fingerprint(tmp_path / "ds")
    assert fingerprint(ds) == ds._fingerprint


def test_hf_dataset_nulls_are_absent_and_bad_rows_are_located():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([
        {"group": "g", "id": None, "prompt": "p", "response": "r"},
        {"group": None, "id": "x", "prompt": "p", "response": "r"},
    ])
    with pytest.raises(DataError, match=r"dataset\[train\]:1: field 'group': missing"):
        load_records(ds)
    records, skipped = load_records(ds, on_bad="skip")
    assert records[0].id == "0" and skipped[0]["id"] == "x"


def test_fingerprint_of_files_and_lists(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [GOOD])
    b = write_jsonl(tmp_path / "b.jsonl", [{**GOOD, "response": "5"}])
    import hashlib

    assert fingerprint(a) == hashlib.sha256(a.read_bytes()).hexdigest()
    assert fingerprint(a) != fingerprint(b)
    assert fingerprint([GOOD]) == fingerprint([dict(GOOD)]) != fingerprint([{**GOOD, "response": "5"}])


# ----------------------------------------------------------------------------------------------------------
# Encoding


@pytest.mark.parametrize("tok", [tiny_tokenizer, tiny_base_tokenizer], ids=["chat", "base"])
def test_targets_are_exactly_the_response_ids(tok):
    r = rec()
    e = encode(r, tok(), EncodeOptions())
    assert e.status == "ok" and e.reason == ""
    assert len(e.input_ids) == len(e.target_mask) == e.n_tokens
    assert not e.target_mask[0]
    assert supervised(e) == plain_ids(r.response)
    assert e.target_mask == [False] * e.n_prompt + [True] * (e.n_tokens - e.n_prompt)
    assert e.n_target == len(plain_ids(r.response))
    # changing the prompt changes nothing on the response side
    e2 = encode(rec(prompt="A much longer and different question?"), tok(), EncodeOptions())
    assert supervised(e2) == supervised(e) and e2.n_prompt > e.n_prompt


def test_base_prompt_has_bos_and_newline_separator():
    e = encode(rec(prompt="Q", response="A"), tiny_base_tokenizer(), EncodeOptions())
    tok = tiny_base_tokenizer()
    assert tok.decode(e.input_ids) == "<s>Q\nA"
    assert e.input_ids[0] == tok.bos_token_id and e.n_prompt == 3


def test_chat_prompt_uses_template_with_default_and_custom_system():
    tok = tiny_tokenizer()
    r = rec(prompt="Q", response="A")
    e = encode(r, tok, EncodeOptions())
    assert tok.decode(e.input_ids) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA"
    )
    assert e.input_ids.count(tok.bos_token_id) == 0  # templated text is not given a second BOS
    e = encode(r, tok, EncodeOptions(system_prompt="Be terse."))
    assert tok.decode(e.input_ids).startswith("<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nQ")
    # a record's own system message is kept
    m = Record(0, "0", "g", None, "A", (("system", "Mine."), ("user", "Q"), ("assistant", "A")), "t:1")
    e = encode(m, tok, EncodeOptions(system_prompt="Be terse."))
    assert tok.decode(e.input_ids).startswith("<|im_start|>system\nMine.<|im_end|>")
    assert supervised(e) == plain_ids("A")


def test_chat_option():
    r = rec(prompt="Q", response="A")
    assert tiny_tokenizer().decode(encode(r, tiny_tokenizer(), EncodeOptions(chat="never")).input_ids) == "<s>Q\nA"
    with pytest.raises(ValueError, match="no chat template"):
        encode(r, tiny_base_tokenizer(), EncodeOptions(chat="always"))


def test_messages_record_without_template_joins_contents():
    m = Record(0, "0", "g", None, "A", (("user", "Q1"), ("assistant", "x"), ("user", "Q2"), ("assistant", "A")),
               "t:1")
    e = encode(m, tiny_base_tokenizer(), EncodeOptions())
    assert tiny_base_tokenizer().decode(e.input_ids) == "<s>Q1\nx\nQ2\nA"
    assert supervised(e) == plain_ids("A")


def test_loss_on_all_and_append_eos():
    tok = tiny_base_tokenizer()
    e = encode(rec(), tok, EncodeOptions(loss_on="all"))
    assert e.target_mask == [False] + [True] * (e.n_tokens - 1)
    e = encode(rec(), tok, EncodeOptions(append_eos=True))
    assert e.input_ids[-1] == tok.eos_token_id and e.target_mask[-1]
    assert supervised(e) == plain_ids(rec().response) + [tok.eos_token_id]


def test_truncation_right_cuts_response_tail():
    tok = tiny_base_tokenizer()
    r = rec(prompt="abcdefgh", response="0123456789")  # prompt: <s> + 8 chars + \n = 10 tokens
    e = encode(r, tok, EncodeOptions(max_length=14))
    assert e.status == "ok" and e.n_tokens == 14 and e.n_prompt == 10
    assert tok.decode(supervised(e)) == "0123" and e.n_truncated == 6


def test_response_entirely_truncated_is_skipped():
    r = rec(prompt="abcdefgh", response="0123456789")
    for max_length in (9, 10):
        e = encode(r, tiny_base_tokenizer(), EncodeOptions(max_length=max_length))
        assert e.status == "skipped" and e.input_ids == []
        assert e.reason == f"response entirely truncated (prompt has 10 tokens, max_length {max_length})"


def test_truncation_left_keeps_response_and_bos():
    tok = tiny_base_tokenizer()
    r = rec(prompt="abcdefgh", response="0123456789")
    e = encode(r, tok, EncodeOptions(max_length=14, truncation="left"))
    assert e.status == "ok" and e.n_tokens == 14
    assert tok.decode(e.input_ids) == "<s>gh\n0123456789"
    assert tok.decode(supervised(e)) == "0123456789" and e.n_prompt == 4 and e.n_truncated == 6
    # response longer than max_length: one prompt token stays (the first target needs a context)
    e = encode(r, tok, EncodeOptions(max_length=5, truncation="left"))
    assert tok.decode(e.input_ids) == "\n0123" and e.n_prompt == 1 and not e.target_mask[0]
    assert e.n_target == 4


def test_truncation_skip():
    r = rec(prompt="abcdefgh", response="0123456789")
    e = encode(r, tiny_base_tokenizer(), EncodeOptions(max_length=19, truncation="skip"))
    assert e.status == "skipped" and e.reason == "too long (20 tokens > max_length 19)"
    assert encode(r, tiny_base_tokenizer(), EncodeOptions(max_length=20, truncation="skip")).status == "ok"


@pytest.mark.parametrize("kw", [
    {"max_length": 1}, {"max_length": 2.5}, {"loss_on": "prompt"}, {"truncation": "middle"},
    {"chat": "yes"}, {"system_prompt": 3}, {"append_eos": "no"},
])
def test_encode_options_validation(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        EncodeOptions(**kw)


def test_encode_options_have_help():
    helps = EncodeOptions.help()
    assert set(helps) == {"max_length", "loss_on", "truncation", "chat", "system_prompt", "append_eos"}
    assert all(len(h) > 20 for h in helps.values())


# ----------------------------------------------------------------------------------------------------------
# Batching and padding


def fake(idx: int, n: int, ok: bool = True) -> Encoded:
    if not ok:
        return Encoded(idx, [], [], 0, "skipped", "empty response")
    return Encoded(idx, list(range(1, n + 1)), [j > 0 for j in range(n)], 1)


@settings(max_examples=150, deadline=None)
@given(
    lengths=st.lists(st.tuples(st.integers(1, 300), st.booleans()), max_size=60),
    budget=st.integers(1, 2000),
    max_batch=st.integers(1, 16),
)
def test_make_batches_budget_and_coverage(lengths, budget, max_batch):
    enc = [fake(i, n, ok or i % 7 == 0) for i, (n, ok) in enumerate(lengths)]
    batches = make_batches(enc, token_budget=budget, max_batch=max_batch)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == [i for i, e in enumerate(enc) if e.status == "ok"]  # every ok example exactly once
    for b in batches:
        assert 1 <= len(b) <= max_batch
        longest = max(enc[i].n_tokens for i in b)
        assert len(b) == 1 or len(b) * longest <= budget
        assert [enc[i].n_tokens for i in b] == sorted((enc[i].n_tokens for i in b), reverse=True)
    assert make_batches(enc, token_budget=budget, max_batch=max_batch) == batches


def test_make_batches_example():
    enc = [fake(0, 5), fake(1, 10), fake(2, 3, ok=False), fake(3, 10), fake(4, 30), fake(5, 4)]
    assert make_batches(enc, token_budget=20, max_batch=64) == [[4], [1, 3], [0, 5]]
    assert make_batches(enc, token_budget=1000, max_batch=2) == [[4, 1], [3, 0], [5]]


def test_collate_shapes_and_padding():
    enc = [fake(0, 3), fake(1, 5)]
    out = collate(enc, pad_id=0)
    assert set(out) == {"input_ids", "attention_mask", "target_mask"}
    assert out["input_ids"].shape == out["attention_mask"].shape == out["target_mask"].shape == (2, 5)
    assert out["input_ids"].dtype == out["attention_mask"].dtype == torch.long
    assert out["target_mask"].dtype == torch.bool
    assert out["input_ids"][0].tolist() == [1, 2, 3, 0, 0]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert out["target_mask"][0].tolist() == [False, True, True, False, False]
    assert collate(enc, pad_id=99)["input_ids"][0, 3:].tolist() == [99, 99]
    with pytest.raises(ValueError, match="skipped"):
        collate([fake(0, 3), fake(1, 0, ok=False)], pad_id=0)


def test_end_to_end_jsonl_to_tensors(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [
        {"group": "a", "prompt": f"question {i}", "response": "x" * (i + 1)} for i in range(6)
    ] + [{"group": "a", "prompt": "q", "response": ""}])
    records, _ = load_records(path)
    tok = tiny_tokenizer()
    enc = [encode(r, tok, EncodeOptions(max_length=128)) for r in records]
    assert [e.status for e in enc].count("skipped") == 1
    for b in make_batches(enc, token_budget=200):
        batch = collate([enc[i] for i in b], tok.pad_token_id)
        n_targets = batch["target_mask"].sum(1).tolist()
        assert n_targets == [len(records[i].response) for i in b]
        assert not (batch["target_mask"] & (batch["attention_mask"] == 0)).any()
