import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from multitoken import MTPConfig, MTPModel

HEAD_TYPES = ["linear", "residual", "modulated", "transformer", "sequential"]


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Caches the library writes (cost calibrations, token stores, SmolLM2 copies) go to a session
    folder, never the user's home; the real-model tests (MULTITOKEN_SLOW=1) keep the real cache."""
    import os
    if os.environ.get("MULTITOKEN_SLOW") == "1":
        yield
        return
    old = os.environ.get("MULTITOKEN_CACHE")
    os.environ["MULTITOKEN_CACHE"] = str(tmp_path_factory.mktemp("multitoken-cache"))
    yield
    if old is None:
        os.environ.pop("MULTITOKEN_CACHE", None)
    else:
        os.environ["MULTITOKEN_CACHE"] = old


def tiny_config(head_type: str = "residual", n_future: int = 3, **overrides) -> MTPConfig:
    base = dict(vocab_size=48, d_model=32, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=96,
                n_future=n_future, head_type=head_type)
    base.update(overrides)
    return MTPConfig(**base)


def tiny_model(head_type: str = "residual", n_future: int = 3, seed: int = 0, head_std: float = 0.2,
               **overrides) -> MTPModel:
    """A random tiny model whose heads are *not* at their zero init (so heads disagree)."""
    torch.manual_seed(seed)
    model = MTPModel(tiny_config(head_type, n_future, **overrides))
    for p in model.heads.parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=head_std)
    return model.eval()


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


class RankedStub:
    """Base head emits script[pos + 1] at position pos (= committed length + depth), whatever
    the content; head j at committed length L puts the true next token script[L + j] at
    rank ``rank(L, j)`` of its logits. Lets tests dictate which tree path is right."""

    vocab_size, n_future, max_seq_len = 10, 4, 1000

    def __init__(self, script, rank=lambda length, j: 0):
        self.script, self.rank = torch.tensor(script), rank

    def new_state(self, batch, capacity):
        return SimpleNamespace(lengths=torch.zeros(batch, dtype=torch.long), capacity=capacity)

    def verify(self, state, tokens, tree_mask=None, depths=None):
        depths = torch.arange(tokens.shape[1]) if depths is None else depths
        pos = state.lengths[:, None] + depths
        return torch.nn.functional.one_hot(self.script[pos + 1], self.vocab_size).float() * 20

    def accept(self, state, keep, counts):
        state.lengths = state.lengths + counts

    def crop(self, state, lengths):
        state.lengths = lengths.clone()

    def draft(self, state, next_tokens, k, pick):
        length = int(state.lengths[0])
        rows = []
        for j in range(1, k + 1):
            true = int(self.script[length + j])
            order = [t for t in range(self.vocab_size) if t != true]
            order.insert(self.rank(length, j), true)
            logits = torch.empty(self.vocab_size)
            logits[torch.tensor(order)] = -torch.arange(self.vocab_size, dtype=torch.float)
            rows.append(logits)
        logits = torch.stack(rows)[None]
        return torch.stack([pick(logits[:, j], j) for j in range(k)], 1), logits


WORDS = "def return import class self for in if else while print value result items key data".split()


def write_corpus(d: Path, n_files: int = 40, seed: int = 0) -> Path:
    rng = random.Random(seed)
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        body = "\n".join(f"def f{i}_{j}(x):\n    return " + " ".join(rng.choice(WORDS) for _ in range(6))
                         for j in range(12))
        (d / f"mod{i}.py").write_text(body + "\n")
    return d


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small synthetic Python corpus, one per test module."""
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture
def token_cache(tmp_path_factory, monkeypatch):
    """One token cache per test session, never the user's ~/.cache (use with usefixtures)."""
    monkeypatch.setenv("MULTITOKEN_CACHE", str(tmp_path_factory.getbasetemp() / "token-cache"))


def hf_greedy(base, ids: torch.Tensor, max_new_tokens: int, **kwargs) -> list[int]:
    """HF ``generate`` greedy continuation of ids (1, T). Every prompt token is attended: without
    an explicit mask, HF treats prompt tokens equal to pad_token_id as padding."""
    out = base.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                        **kwargs)
    return out[0, ids.shape[1]:].tolist()
