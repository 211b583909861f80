import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json

import pytest

from helpers import tiny_model, tiny_tokenizer


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A saved tiny Llama + tokenizer: exercises the HF-directory loading path."""
    d = tmp_path_factory.mktemp("tiny-llama")
    tiny_model().save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def data_file(tmp_path_factory):
    from gradsight.demo.problems import demo_records

    p = tmp_path_factory.mktemp("data") / "data.jsonl"
    with open(p, "w") as fh:
        for r in demo_records(n_problems=8):
            fh.write(json.dumps(r) + "\n")
    return p


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-tensor tests: on a shared 2-core machine OpenMP spin-waiting
    makes tiny BLAS calls with 2 threads up to ~1000x slower than with 1."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
