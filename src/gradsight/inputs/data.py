"""Records, tokenization with response-only loss masks, truncation, length bucketing and padding.

Data flow::

    load_records(source)            JSONL / HF dataset / list of dicts -> [Record], [flagged skips]
    encode(record, tokenizer, opts) Record -> Encoded(input_ids, target_mask, status, reason)
    make_batches(encoded)           length-bucketed batches of indices under a token budget
    collate(batch, pad_id)          right-padded tensors for one forward/backward

Record layouts (one JSON object per line, or one row of a dataset):

* ``{"group", "prompt", "response"}``
* ``{"group", "messages": [{"role", "content"}, ..., {"role": "assistant", "content"}]}``: the last assistant
  message is the response, everything before it is the prompt.
* ``{"group", "instruction", "input"?, "output"}`` (the Layer_Gradient layout): prompt = instruction, plus
  ``"\\n" + input`` when input is non-empty; response = output.

``id`` is optional (string or integer; default: the record's 0-based position). A field whose value is null is
treated as absent.

Loss-term layouts (``gradsight geometry``; ``load_records(..., terms=True)``). Each record becomes one or more
*loss terms*, each a (prompt, response) sequence whose gradient is taken separately:

* plain records above: one term named ``loss`` (role ``loss``).
* preference pairs ``{"group", "prompt", "chosen", "rejected"}``: terms ``chosen`` and ``rejected`` (role
  ``pair``); both sides are required.
* rewarded rollouts ``{"group", "prompt", "response", "reward"}``: one term ``rollout`` (role ``rollout``)
  with a finite numeric reward (``true``/``false`` count as 1/0).
* named terms ``{"group", "prompt", "terms": {"sft": "...", "aux": "..."}}``: one term per name (role
  ``term``). A term name keeps one role across the file: using ``chosen`` as a named term after it was a
  pair side (or a named term as ``loss``) is an error naming both places.

Loss convention (Li, Li, Zhou 2025, "What Happened in LLMs Layers when Trained for Fast vs. Slow Thinking"):
the loss of an example is the token mean of ``-log p(y_j | y_<j)`` over its supervised targets, which are the
response tokens. Prompt and response are tokenized *separately* and the ids concatenated, so the response
boundary is exact (tokenizing the joined text can merge tokens across the boundary, and tokenizing a
templated text with special tokens can add a second BOS).
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "DataError",
    "Record",
    "load_records",
    "EncodeOptions",
    "Encoded",
    "encode",
    "prompt_ids",
    "make_batches",
    "BatchCost",
    "collate",
    "fingerprint",
]

_TABLE_SUFFIXES = {".parquet": "parquet", ".csv": "csv"}


# ----------------------------------------------------------------------------------------------------------
# Errors and records


class DataError(ValueError):
    """A problem with the input data; the message names the location (``file:line``) and the field.

    Attributes:
        location: ``path:line``, ``name[split]:row``, or just the path for whole-source problems.
        field: the offending field, or None (malformed JSON, empty file, ...).
        problem: what is wrong, in words.
    """

    def __init__(self, location: str, problem: str, field: str | None = None):
        self.location = location
        self.field = field
        self.problem = problem
        super().__init__(f"{location}: {self.reason}")

    @property
    def reason(self) -> str:
        """The message without the location (the ``reason`` of a flagged skip)."""
        return f"field '{self.field}': {self.problem}" if self.field else self.problem

    def __reduce__(self):  # picklable despite the custom __init__ (errors may cross processes)
        return (type(self), (self.location, self.problem, self.field))


class _Bad(Exception):
    """A bad field inside one record; turned into a DataError or a flagged skip by load_records."""

    def __init__(self, field: str | None, problem: str):
        super().__init__(problem)
        self.field = field
        self.problem = problem


@dataclass(frozen=True)
class Record:
    """One input example.

    Attributes:
        idx: 0-based position among the records of the source (blank JSONL lines are not records).
        id: the ``id`` field as a string, else ``str(idx)``.
        group: the condition the example belongs to (e.g. ``"fast"``, ``"slow"``).
        prompt: the prompt text (None for ``messages`` records).
        response: the response text (the supervised part).
        messages: the whole conversation as (role, content) pairs, final assistant message included
            (None for prompt/response records).
        source: ``path:line`` (JSONL, 1-based line) or ``name[split]:row`` (datasets, 0-based row).
        role: ``loss`` (plain), ``pair`` (preference pair), ``rollout`` (rewarded response) or ``term``
            (named loss terms); see the module docstring.
        terms: (name, response) per loss term for pairs and named terms, else None.
        reward: the rollout's reward, else None.
    """

    idx: int
    id: str
    group: str
    prompt: str | None
    response: str | None
    messages: tuple[tuple[str, str], ...] | None
    source: str
    role: str = "loss"
    terms: tuple[tuple[str, str], ...] | None = None
    reward: float | None = None

    @property
    def term_list(self) -> list[tuple[str, str]]:
        """(term name, response) of every loss term of the record (``[("loss", response)]`` when plain)."""
        if self.terms is not None:
            return list(self.terms)
        return [("rollout" if self.role == "rollout" else "loss", self.response or "")]

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        """The prompt as chat messages: the conversation without its final assistant turn, or one user turn."""
        if self.messages is not None:
            return [{"role": r, "content": c} for r, c in self.messages[:-1]]
        return [{"role": "user", "content": self.prompt or ""}]

    @property
    def prompt_text(self) -> str:
        """The prompt as plain text (message contents joined by newlines for ``messages`` records)."""
        if self.messages is not None:
            return "\n".join(c for _, c in self.messages[:-1])
        return self.prompt or ""


def _type_name(v: Any) -> str:
    if v is None:
        return "null"
    return {dict: "dict", list: "list", tuple: "list", bool: "bool", float: "float", str: "string"}.get(
        type(v), type(v).__name__
    )


def _present(row: Mapping, name: str) -> Any:
    """row[name], with None (JSON null, Arrow null) and float NaN (pandas) meaning absent."""
    v = row.get(name)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return v


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _string(row: Mapping, name: str, *, required: bool) -> str | None:
    v = _present(row, name)
    if v is None:
        if required:
            raise _Bad(name, "missing")
        return None
    if not isinstance(v, str):
        raise _Bad(name, f"expected a string, got {_type_name(v)}")
    return v


def _content(v: Any, k: int) -> str:
    if isinstance(v, str):
        return v
    # OpenAI-style content parts: [{"type": "text", "text": ...}, ...]
    if isinstance(v, (list, tuple)) and all(isinstance(p, Mapping) for p in v):
        if all(p.get("type") == "text" and isinstance(p.get("text"), str) for p in v):
            return "".join(p["text"] for p in v)
        raise _Bad("messages", f"message {k}: only text content is supported")
    raise _Bad("messages", f"message {k}: 'content' must be a string, got {_type_name(v)}")


def _messages(v: Any) -> tuple[tuple[str, str], ...]:
    if hasattr(v, "tolist") and not isinstance(v, (list, tuple)):  # numpy array from a table
        v = v.tolist()
    if not isinstance(v, (list, tuple)) or not v:
        raise _Bad("messages", f"expected a non-empty list of {{'role', 'content'}} objects, got {_type_name(v)}")
    out = []
    for k, m in enumerate(v):
        if not isinstance(m, Mapping):
            raise _Bad("messages", f"message {k}: expected an object with 'role' and 'content', got {_type_name(m)}")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise _Bad("messages", f"message {k}: 'role' must be a non-empty string, got {_type_name(role)}")
        if m.get("content") is None:
            raise _Bad("messages", f"message {k}: 'content' is missing")
        out.append((role, _content(m["content"], k)))
    if out[-1][0] != "assistant":
        raise _Bad(
            "messages", f"the last message must have role 'assistant' (it is the response), got '{out[-1][0]}'"
        )
    return tuple(out)


def _group(row: Mapping, name: str) -> str:
    v = _present(row, name)
    if v is None:
        raise _Bad(name, "missing (every record needs a group, a string or an integer)")
    if _is_int(v):
        return str(int(v))
    if not isinstance(v, str):
        raise _Bad(name, f"unknown group field type: expected a string or integer, got {_type_name(v)}")
    if not v.strip():
        raise _Bad(name, "empty string")
    return v


def _id(row: Mapping, name: str) -> str | None:
    v = _present(row, name)
    if v is None:
        return None
    if _is_int(v):
        return str(int(v))
    if not isinstance(v, str):
        raise _Bad(name, f"expected a string or integer, got {_type_name(v)}")
    if not v.strip():
        raise _Bad(name, "empty string")
    return v


_LAYOUT_HELP = "a record needs 'prompt' and 'response', or 'messages', or 'instruction' and 'output'"
_TERM_KEYS = ("chosen", "rejected", "terms", "reward")


def _reward(row: Mapping) -> float:
    v = row.get("reward")
    if isinstance(v, bool):
        return float(v)
    if not isinstance(v, numbers.Real):
        raise _Bad("reward", f"expected a number, got {_type_name(v)} {str(v)[:40]!r}")
    if not math.isfinite(float(v)):
        raise _Bad("reward", f"must be finite, got {v}")
    return float(v)


def _term_dict(v: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(v, Mapping) or not v:
        raise _Bad("terms", f"expected a non-empty object {{name: response}}, got {_type_name(v)}")
    out = []
    for name, resp in v.items():
        if not isinstance(name, str) or not name.strip():
            raise _Bad("terms", f"term names must be non-empty strings, got {name!r}")
        if not isinstance(resp, str):
            raise _Bad("terms", f"term '{name}': expected a response string, got {_type_name(resp)}")
        out.append((name, resp))
    return tuple(out)


def _parse(row: Any, idx: int, source: str, group_field: str, id_field: str, terms: bool = False) -> Record:
    if not isinstance(row, Mapping):
        raise _Bad(None, f"expected a JSON object, got {_type_name(row)}")
    rid = _id(row, id_field)
    group = _group(row, group_field)
    present = {k for k in (*_TERM_KEYS, "response", "messages", "output") if _present(row, k) is not None}
    if not terms and present & {"chosen", "rejected", "terms"}:
        key = sorted(present & {"chosen", "rejected", "terms"})[0]
        raise _Bad(key, "preference pairs and named loss terms are analysed by `gradsight geometry`, "
                        "not `gradsight layers`")
    base = dict(idx=idx, id=rid if rid is not None else str(idx), group=group, source=source)
    if terms and present & {"chosen", "rejected"}:  # preference pair
        for other in ("response", "messages", "output", "terms", "reward"):
            if other in present:
                raise _Bad(other, "ambiguous record: a preference pair ('chosen'/'rejected') cannot also have "
                                  f"'{other}'")
        for side in ("chosen", "rejected"):
            if side not in present:
                raise _Bad(side, "missing (a preference pair needs both 'chosen' and 'rejected')")
        prompt = _pair_prompt(row)
        pair = (("chosen", _string(row, "chosen", required=True)), ("rejected", _string(row, "rejected", required=True)))
        return Record(**base, prompt=prompt, response=None, messages=None, role="pair", terms=pair)
    if terms and "terms" in present:
        for other in ("response", "messages", "output", "reward"):
            if other in present:
                raise _Bad(other, f"ambiguous record: named 'terms' cannot also have '{other}'")
        return Record(**base, prompt=_pair_prompt(row), response=None, messages=None, role="term",
                      terms=_term_dict(row["terms"]))
    rec = _parse_plain(row, base)
    if terms and "reward" in present:
        rec = replace(rec, role="rollout", reward=_reward(row))
    return rec


def _pair_prompt(row: Mapping) -> str:
    """The prompt of a pair / named-terms record: 'prompt', or 'instruction' (+ 'input')."""
    if _present(row, "prompt") is not None:
        return _string(row, "prompt", required=True)
    if _present(row, "instruction") is not None:
        extra = _string(row, "input", required=False)
        return _string(row, "instruction", required=True) + ("\n" + extra if extra else "")
    raise _Bad("prompt", "missing (pairs and named terms need a 'prompt' or an 'instruction')")


def _parse_plain(row: Mapping, base: dict) -> Record:
    layouts = [
        name
        for name, keys in (
            ("messages", ("messages",)),
            ("prompt/response", ("prompt", "response")),
            ("instruction/output", ("instruction", "output")),
        )
        if any(_present(row, k) is not None for k in keys)
    ]
    if len(layouts) > 1:
        raise _Bad(layouts[0].split("/")[0], f"ambiguous record: has both {layouts[0]} and {layouts[1]} fields")
    prompt = messages = None
    if not layouts:
        raise _Bad("response", f"missing ({_LAYOUT_HELP})")
    if layouts[0] == "messages":
        messages = _messages(row["messages"])
        response = messages[-1][1]
    elif layouts[0] == "prompt/response":
        prompt = _string(row, "prompt", required=True)
        response = _string(row, "response", required=True)
    else:
        instruction = _string(row, "instruction", required=True)
        extra = _string(row, "input", required=False)
        response = _string(row, "output", required=True)
        prompt = instruction + ("\n" + extra if extra else "")
    return Record(**base, prompt=prompt, response=response, messages=messages)


# ----------------------------------------------------------------------------------------------------------
# Sources


def _jsonl_rows(path: Path, label: str) -> Iterator[tuple[str, Any]]:
    """(location, parsed object or _Bad) for every non-blank line."""
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte order mark
        data = data[3:]
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        loc = f"{label}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield loc, _Bad(None, f"not valid UTF-8 (byte {e.start + 1})")
            continue
        if not line.strip():
            continue
        if lineno == 1 and line.lstrip().startswith("[") and path.suffix == ".json":
            raise DataError(label, "looks like a JSON array; expected JSON Lines (one object per line)")
        try:
            yield loc, json.loads(line)
        except json.JSONDecodeError as e:
            yield loc, _Bad(None, f"malformed JSON ({e.msg} at column {e.colno})")


def _dataset_rows(ds: Any, name: str, split: str) -> Iterator[tuple[str, Any]]:
    for i, row in enumerate(ds):
        yield f"{name}[{split}]:{i}", row


def _pick_split(ds: Any, split: str, label: str) -> Any:
    """A Dataset from a Dataset or DatasetDict."""
    if hasattr(ds, "column_names") and not isinstance(ds.column_names, Mapping):
        return ds
    if isinstance(ds, Mapping):
        if split not in ds:
            raise DataError(label, f"no split '{split}' (available: {', '.join(map(str, ds))})")
        return ds[split]
    raise DataError(label, f"expected a datasets.Dataset, got {type(ds).__name__}")


def _load_dir(path: Path, split: str, label: str) -> Any:
    import datasets

    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        return _pick_split(datasets.load_from_disk(str(path)), split, label)
    try:  # a local directory of data files (json/csv/parquet/...), loaded by datasets' packaged builders
        return datasets.load_dataset(str(path), split=split)
    except (FileNotFoundError, ValueError) as e:
        raise DataError(label, f"cannot load as a Hugging Face dataset ({e})") from e


def _open(source: Any, split: str) -> tuple[str, str, Iterator[tuple[str, Any]]]:
    """(label, what-is-empty message, rows) for any supported source."""
    if isinstance(source, (str, os.PathLike)):
        path, label = Path(source), str(source)
        if not path.exists():
            raise DataError(label, "no such file or directory")
        if path.is_dir():
            return label, "the dataset is empty", _dataset_rows(_load_dir(path, split, label), label, split)
        if path.suffix in _TABLE_SUFFIXES:
            import datasets

            ds = datasets.load_dataset(_TABLE_SUFFIXES[path.suffix], data_files=str(path), split="train")
            return label, "the file is empty", _dataset_rows(ds, label, "train")
        return label, "the file is empty", _jsonl_rows(path, label)
    if isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        return "records", "the list is empty", ((f"records:{i}", row) for i, row in enumerate(source))
    if isinstance(source, Mapping) or hasattr(source, "column_names"):  # datasets.Dataset / DatasetDict
        label = getattr(getattr(source, "info", None), "dataset_name", None) or "dataset"
        ds = _pick_split(source, split, label)
        return label, "the dataset is empty", _dataset_rows(ds, label, str(ds.split or split))
    raise TypeError(
        f"unsupported data source {type(source).__name__}: expected a path (.jsonl file or dataset directory), "
        "a datasets.Dataset, or a list of dicts"
    )


def load_records(
    source: Any,
    *,
    split: str = "train",
    on_bad: str = "error",
    group_field: str = "group",
    id_field: str = "id",
    terms: bool = False,
) -> tuple[list[Record], list[dict]]:
    """Read and validate every record of a data source.

    Args:
        source: a ``.jsonl`` path; a directory saved with ``datasets.Dataset.save_to_disk`` (or a local directory
            of data files ``datasets.load_dataset`` reads offline); a ``datasets.Dataset``/``DatasetDict``; or a
            list of dicts. ``.parquet``/``.csv`` files are read with datasets' builders.
        split: the split to use for dataset dicts and data directories.
        on_bad: ``"error"`` raises a DataError at the first bad record; ``"skip"`` returns bad records as
            flagged skips instead.
        group_field, id_field: names of the group and id fields.
        terms: accept the loss-term layouts (preference pairs, rewarded rollouts, named terms) and check that
            every term name keeps one role across the source.

    Returns:
        (records, skipped): the valid records in source order, and one dict per bad record
        ``{"idx", "id", "group", "source", "reason"}`` (group ``""`` when unknown). Bad records keep their
        ``idx`` (position in the source), so ``idx`` is unique over both lists.

    Raises:
        DataError: bad record (with on_bad="error"), missing path, empty source, or no valid record at all.

    Empty responses are not errors: they load and are skipped by ``encode`` with reason ``"empty response"``.
    """
    if on_bad not in ("error", "skip"):
        raise ValueError(f"on_bad must be 'error' or 'skip', got {on_bad!r}")
    label, empty, rows = _open(source, split)
    records: list[Record] = []
    skipped: list[dict] = []
    seen: dict[str, str] = {}  # id -> location of its first record
    roles: dict[str, tuple[str, str]] = {}  # term name -> (role, location of its first use)
    idx = -1
    for idx, (loc, row) in enumerate(rows):
        try:
            if isinstance(row, _Bad):
                raise row
            rec = _parse(row, idx, loc, group_field, id_field, terms)
            if rec.id in seen:
                raise _Bad(id_field, f"duplicate id '{rec.id}' (first at {seen[rec.id]})")
            if terms:
                _check_roles(rec, roles, loc)
            seen[rec.id] = loc
            records.append(rec)
        except _Bad as bad:
            err = DataError(loc, bad.problem, bad.field)
            if on_bad == "error":
                raise err from None
            skipped.append(
                {"idx": idx, **_salvage(row, idx, group_field, id_field), "source": loc, "reason": err.reason}
            )
    n = idx + 1
    if n == 0:
        raise DataError(label, f"no records ({empty})")
    if not records:
        first = skipped[0]
        raise DataError(label, f"no valid records (all {n} are bad; first: {first['source']}: {first['reason']})")
    return records, skipped


_ROLE_TEXT = {"pair": "a preference-pair side", "term": "a named term", "rollout": "a rewarded rollout",
              "loss": "a plain response"}


def _check_roles(rec: Record, roles: dict[str, tuple[str, str]], loc: str) -> None:
    """A term name keeps the role of its first use (e.g. 'chosen' is a pair side everywhere)."""
    field = {"pair": "chosen", "term": "terms", "rollout": "reward", "loss": "response"}[rec.role]
    for name, _ in rec.term_list:
        role, first = roles.get(name, (rec.role, loc))
        if role != rec.role:
            raise _Bad(field, f"loss-term name '{name}' is used as {_ROLE_TEXT[rec.role]} here but as "
                              f"{_ROLE_TEXT[role]} at {first}; give different kinds of terms different names")
    for name, _ in rec.term_list:
        roles.setdefault(name, (rec.role, loc))


def _salvage(row: Any, idx: int, group_field: str, id_field: str) -> dict:
    """id and group of a bad record, as far as they can be read."""
    out = {"id": str(idx), "group": ""}
    if isinstance(row, Mapping):
        for key, fn in (("id", _id), ("group", _group)):
            try:
                v = fn(row, id_field if key == "id" else group_field)
            except _Bad:
                continue
            if v is not None:
                out[key] = v
    return out


def fingerprint(source: Any) -> str:
    """A content hash of a data source (sha256 hex, or a dataset's own ``_fingerprint``).

    Files: sha256 of their bytes. Directories: sha256 over (relative path, bytes) of every file, in sorted order.
    ``datasets.Dataset``: its ``_fingerprint``. Lists of dicts and dataset dicts: sha256 of their JSON.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise DataError(str(source), "no such file or directory")
        h = hashlib.sha256()
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for f in files:
            if f is not path:
                h.update(f.relative_to(path).as_posix().encode() + b"\0")
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
        return h.hexdigest()
    fp = getattr(source, "_fingerprint", None)
    if isinstance(fp, str):
        return fp
    if isinstance(source, Mapping) and all(hasattr(v, "_fingerprint") for v in source.values()):
        payload: Any = {str(k): v._fingerprint for k, v in source.items()}
    else:
        payload = list(source)
    blob = json.dumps(payload, sort_keys=True, default=str, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()


# ----------------------------------------------------------------------------------------------------------
# Encoding


_CHOICES = {
    "loss_on": ("response", "all"),
    "truncation": ("right", "left", "skip"),
    "chat": ("auto", "always", "never"),
}


@dataclass(frozen=True)
class EncodeOptions:
    """How records become token ids and loss masks."""

    max_length: int = field(
        default=1024,
        metadata={"help": "Maximum tokens per example (prompt + response); 1024 in the fast/slow-thinking paper."},
    )
    loss_on: str = field(
        default="response",
        metadata={"help": "Supervised tokens: 'response' (response tokens only, as in the paper) or 'all'."},
    )
    truncation: str = field(
        default="right",
        metadata={
            "help": "Examples longer than max_length: 'right' cuts the end (the response tail, as the paper "
            "does); 'left' drops prompt tokens from the start (keeping BOS) so the response is kept; "
            "'skip' skips the example."
        },
    )
    chat: str = field(
        default="auto",
        metadata={
            "help": "Chat template: 'auto' uses the tokenizer's chat template when it has one, 'always' "
            "requires one, 'never' feeds plain text (prompt + newline + response)."
        },
    )
    system_prompt: str | None = field(
        default=None,
        metadata={
            "help": "System message added to chat prompts that have none (default: the template's own "
            "default, if any). Ignored without a chat template."
        },
    )
    append_eos: bool = field(
        default=False,
        metadata={"help": "Append the tokenizer's EOS token to the response (as a supervised target)."},
    )

    def __post_init__(self):
        if not _is_int(self.max_length) or self.max_length < 2:
            raise ValueError(
                f"max_length must be an integer >= 2 (a prompt token and a target), got {self.max_length!r}"
            )
        for name, allowed in _CHOICES.items():
            v = getattr(self, name)
            if v not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {v!r}")
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise ValueError(f"system_prompt must be a string or None, got {type(self.system_prompt).__name__}")
        if not isinstance(self.append_eos, bool):
            raise ValueError(f"append_eos must be a bool, got {self.append_eos!r}")

    @classmethod
    def help(cls) -> dict[str, str]:
        """Field name -> help text."""
        return {f.name: f.metadata["help"] for f in fields(cls)}


@dataclass
class Encoded:
    """A tokenized example.

    Attributes:
        idx: the record's idx.
        input_ids: tokens fed to the model (empty when skipped).
        target_mask: same length; True at j iff the loss includes -log p(input_ids[j] | input_ids[:j]).
            Never True at j = 0.
        n_prompt: prompt tokens kept in input_ids (before truncation when skipped).
        status: "ok" or "skipped".
        reason: "" when ok, else a human sentence.
        n_truncated: tokens removed by truncation.
    """

    idx: int
    input_ids: list[int]
    target_mask: list[bool]
    n_prompt: int
    status: str = "ok"
    reason: str = ""
    n_truncated: int = 0

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def n_target(self) -> int:
        return sum(self.target_mask)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _as_ids(out: Any) -> list[int]:
    """Token ids from apply_chat_template / __call__ output (list, BatchEncoding/dict, or tensor)."""
    if isinstance(out, Mapping):
        out = out["input_ids"]
    if hasattr(out, "tolist"):
        out = out.tolist()
    if out and isinstance(out[0], (list, tuple)):  # batched form with one conversation
        if len(out) != 1:
            raise ValueError(f"expected one sequence of ids, got {len(out)}")
        out = out[0]
    return [int(t) for t in out]


def _use_chat(tokenizer: Any, chat: str) -> bool:
    has = bool(getattr(tokenizer, "chat_template", None))
    if chat == "always" and not has:
        raise ValueError("chat='always' but the tokenizer has no chat template")
    return has and chat != "never"


def prompt_ids(record: Record, tokenizer: Any, opts: EncodeOptions) -> list[int]:
    """Token ids of the prompt, ending where the response starts.

    Chat template: the conversation without its final assistant turn (plus ``opts.system_prompt`` as a system
    message when it has none), with the generation prompt, special tokens as the template writes them.
    Plain: ``prompt + "\\n"`` tokenized with the tokenizer's special tokens (e.g. BOS).
    """
    if _use_chat(tokenizer, opts.chat):
        msgs = record.prompt_messages
        if opts.system_prompt is not None and not (msgs and msgs[0]["role"] == "system"):
            msgs = [{"role": "system", "content": opts.system_prompt}, *msgs]
        try:
            out = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        except Exception as e:  # jinja errors (e.g. "System role not supported"): say which record
            raise ValueError(f"{record.source}: the chat template failed: {e}") from e
        return _as_ids(out)
    return _as_ids(tokenizer(record.prompt_text + "\n", add_special_tokens=True))


def encode(record: Record, tokenizer: Any, opts: EncodeOptions | None = None) -> Encoded:
    """Tokenize one record: prompt and response separately, ids concatenated, loss mask on the response.

    Skips (status "skipped", input_ids empty) with a reason: empty response; response entirely truncated
    (truncation="right" and the prompt fills max_length); longer than max_length (truncation="skip").
    """
    opts = opts or EncodeOptions()

    def skip(reason: str, n_prompt: int = 0) -> Encoded:
        return Encoded(record.idx, [], [], n_prompt, "skipped", reason)

    if not (record.response or "").strip():
        return skip("empty response")
    p = prompt_ids(record, tokenizer, opts)
    r = _as_ids(tokenizer(record.response, add_special_tokens=False))
    if opts.append_eos:
        if tokenizer.eos_token_id is None:
            raise ValueError("append_eos=True but the tokenizer has no EOS token")
        r.append(int(tokenizer.eos_token_id))
    if not r:
        return skip("response has no tokens")

    M, n_p, total = opts.max_length, len(p), len(p) + len(r)
    if total > M:
        if opts.truncation == "skip":
            return skip(f"too long ({total} tokens > max_length {M})", n_p)
        if opts.truncation == "right":
            if n_p >= M:
                return skip(f"response entirely truncated (prompt has {n_p} tokens, max_length {M})", n_p)
        else:  # left: drop prompt tokens from the start, keeping BOS and at least one prompt token
            keep = max(M - len(r), 1)
            if keep < n_p:
                bos = getattr(tokenizer, "bos_token_id", None)
                head = p[:1] if keep >= 2 and bos is not None and p[0] == bos else []
                p = head + p[n_p - (keep - len(head)):]
        r = r[: M - len(p)]  # right cut; for 'left' only when the response alone does not fit
    ids = p + r
    start = 1 if opts.loss_on == "all" else max(len(p), 1)
    mask = [j >= start for j in range(len(ids))]
    return Encoded(record.idx, ids, mask, len(p), "ok", "", total - len(ids))


# ----------------------------------------------------------------------------------------------------------
# Batching lives in inputs/batching.py (the cost model and its calibration); records, encoding and batching are
# one pipeline, so its entry points are importable from here too.

from .batching import BatchCost, collate, make_batches  # noqa: E402
