"""Shipped English text for LM pruning: a calibration sample and a disjoint held-out evaluation sample.

Both come from Python's own ``pydoc_data.topics.topics`` (the prose of the Python language reference, PSF
licence; see data/README.txt). The split is deterministic: the topic keys are sorted and alternate topics go to
calibration (even positions) and held-out (odd positions), so the two samples share no topic and no paragraph.
Only prose paragraphs are kept (code, grammar and tables are dropped) and each is reflowed onto one line.

Windows: `token_windows` cuts a tokenised sample into fixed-length windows, either consecutive non-overlapping
ones (evaluation: every token is predicted once per window) or `n` windows at seeded random offsets
(calibration, like Wanda's C4 sampler ``lib/data.py::get_c4``: ``i = random.randint(0, len - seqlen - 1)``).
"""

from __future__ import annotations

import random
import re
import textwrap
from importlib import resources
from typing import Iterable, Mapping

import torch

__all__ = ["SAMPLES", "sample_text", "token_windows", "build_sample", "text_records", "write_text_records"]

SAMPLES = {"calibration": "calibration.txt", "heldout": "heldout.txt"}
_UNDERLINE = re.compile(r"(?m)^\s*([*=~^\-])\1{3,}\s*$")  # reST-style title underlines


def sample_text(name: str) -> str:
    """The shipped sample `name` ("calibration" or "heldout") as one string (~40 KB of English prose)."""
    if name not in SAMPLES:
        raise ValueError(f"unknown text sample {name!r}; expected one of {', '.join(SAMPLES)}")
    return resources.files(__package__).joinpath("data").joinpath(SAMPLES[name]).read_text(encoding="utf-8")


def token_windows(tokenizer, text: str, seqlen: int, n: int | None = None, seed: int | None = None
                  ) -> torch.Tensor:
    """Fixed-length token windows of `text`.

    Args:
        tokenizer: a Hugging Face tokenizer; the text is encoded once without special tokens.
        text: the text to cut.
        seqlen: tokens per window.
        n: number of windows. Without `seed`: the first `n` consecutive windows (all complete ones when None).
            With `seed`: `n` windows (required) at offsets ``random.Random(seed).randint(0, L - seqlen)``.
        seed: None for consecutive non-overlapping windows (evaluation), an int for seeded random windows
            (calibration; windows may overlap, as in Wanda's sampler).

    Returns:
        LongTensor (n, seqlen).

    Raises:
        ValueError: seqlen < 2, the text is shorter than one window, n < 1, or n missing with a seed.
    """
    if seqlen < 2:
        raise ValueError(f"seqlen must be at least 2 tokens, got {seqlen}")
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)  # (L,)
    L = ids.numel()
    if L < seqlen:
        raise ValueError(f"the text has {L} tokens, fewer than one window of seqlen={seqlen}")
    if n is not None and n < 1:
        raise ValueError(f"n must be a positive number of windows, got {n}")
    if seed is None:
        total = L // seqlen
        n = total if n is None else min(n, total)
        return ids[: n * seqlen].view(n, seqlen).clone()  # (n, seqlen)
    if n is None:
        raise ValueError("random windows (seed given) need the number of windows n")
    rng = random.Random(seed)
    starts = [rng.randint(0, L - seqlen) for _ in range(n)]
    return torch.stack([ids[s:s + seqlen] for s in starts])  # (n, seqlen)


def _is_prose(par: str) -> bool:
    """A paragraph of running English: >= 8 words, mostly letters, a sentence end, no grammar/doctest/code."""
    flat = " ".join(par.split())
    if len(flat.split()) < 8 or "::=" in par or ">>>" in par or not re.search(r"[.?!:][\"')]?(\s|$)", flat):
        return False
    letters = sum(c.isalpha() or c == " " for c in flat) / len(flat)
    lines = par.splitlines()
    code_like = any(ln.rstrip().endswith((":", "{", "(")) and nxt.startswith(" ") and not ln.startswith(" ")
                    for ln, nxt in zip(lines, lines[1:]))
    return letters > 0.85 and not code_like


def _paragraphs(topic: str) -> Iterable[str]:
    for par in re.split(r"\n\s*\n", _UNDERLINE.sub("", topic)):
        par = textwrap.dedent(par).strip("\n")
        if par.strip() and _is_prose(par):
            yield " ".join(par.split())  # reflow onto one line


def build_sample(name: str, topics: Mapping[str, str] | None = None, target_chars: int = 40_000) -> str:
    """Rebuild a sample from ``pydoc_data.topics`` (how data/*.txt were made; depends on the Python version).

    Sorted topic keys; even positions -> calibration, odd -> heldout; prose paragraphs in order, joined by blank
    lines, until the sample reaches `target_chars` characters (whole paragraphs only). A paragraph that also
    occurs in a topic of the other side, or earlier in this sample, is skipped, so the samples share no text.
    """
    if name not in SAMPLES:
        raise ValueError(f"unknown text sample {name!r}; expected one of {', '.join(SAMPLES)}")
    if topics is None:
        from pydoc_data.topics import topics
    side = 0 if name == "calibration" else 1
    keys = sorted(topics)[side::2]
    # a few paragraphs are repeated across topics (e.g. "if" inside "compound"): keep neither side's copy
    other = {p for k in sorted(topics)[1 - side::2] for p in _paragraphs(topics[k])}
    out: list[str] = []
    size = 0
    for key in keys:
        for par in _paragraphs(topics[key]):
            if par in other or par in out:
                continue
            if size >= target_chars:
                return "\n\n".join(out) + "\n"
            out.append(par)
            size += len(par) + 2
    return "\n\n".join(out) + "\n"


def text_records(text: str, chars: int = 1200, group: str = "text") -> list[dict]:
    """Records of plain text for `gradsight importance` (calibration / evaluation data): consecutive chunks of
    about `chars` characters cut at paragraph or sentence ends, each ``{"group", "prompt": "", "response"}``.
    Use them with ``loss_on="all", chat="never"`` so that every token is supervised (as in the pruning papers).

    Args:
        text: the text, e.g. `sample_text("calibration")`.
        chars: target chunk size (a chunk never splits a word; ~4 characters per token for English).
    """
    if chars < 16:
        raise ValueError(f"chars must be at least 16, got {chars}")
    words = text.split(" ")
    out, buf, size = [], [], 0
    for w in words:
        buf.append(w)
        size += len(w) + 1
        if size >= chars and (w.endswith((".", "\n")) or size >= 1.5 * chars):
            out.append(" ".join(buf).strip())
            buf, size = [], 0
    if buf and " ".join(buf).strip():
        out.append(" ".join(buf).strip())
    return [{"id": f"{group}-{i}", "group": group, "prompt": "", "response": r} for i, r in enumerate(out)]


def write_text_records(name_or_text: str, path, chars: int = 1200) -> "Path":  # noqa: F821
    """Write the shipped sample `name_or_text` ("calibration" / "heldout", or any text) as a .jsonl of
    `text_records`; returns the path."""
    import json
    from pathlib import Path

    text = sample_text(name_or_text) if name_or_text in SAMPLES else name_or_text
    group = name_or_text if name_or_text in SAMPLES else "text"
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in text_records(text, chars, group)),
                 encoding="utf-8")
    return p
