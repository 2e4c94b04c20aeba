"""MTP heads on a tiny random Hugging Face Llama: protocol exactness, identity with base.generate."""
import pytest
import torch
from conftest import hf_greedy

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from multitoken.decoding import generate  # noqa: E402
from multitoken.hf import HeadsMismatchError, MTPHeadsForCausalLM  # noqa: E402


def tiny_llama(seed=0, vocab=64):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).eval()
    # No EOS: base.generate must run its full length on pure argmax (min_new_tokens would
    # suppress EOS and emit a non-argmax token instead).
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def wrapped(base, head_type, n_future=4, std=0.3, fast_kernels=True, fast_forward=True):
    model = MTPHeadsForCausalLM(base, n_future, head_type, fast_kernels=fast_kernels, fast_forward=fast_forward)
    for p in model.heads.parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=std)
    return model


@pytest.mark.parametrize("head_type,fast_kernels,fast_forward,min_rows", [
    ("residual", True, True, None), ("linear", True, True, 1), ("sequential", True, True, 3),
    ("sequential", False, True, None), ("sequential", True, False, 2), ("residual", False, False, None)])
def test_greedy_modes_equal_base_generate(head_type, fast_kernels, fast_forward, min_rows):
    """Greedy chain/tree output equals base.generate through the lean forward (static cache) and
    HF's forward (DynamicCache), with and without the oneDNN decode kernels (the default on CPU:
    base.generate itself keeps F.linear), with the kernel crossover measured (None) or set, so
    one-token and block passes may take different kernels."""
    from multitoken.hf.kernels import available
    base = tiny_llama(vocab=16)  # a small vocabulary, so drafts are sometimes accepted
    model = wrapped(base, head_type, fast_kernels=fast_kernels, fast_forward=fast_forward)
    model.kernel_min_rows = min_rows
    assert model.fast_kernels == (fast_kernels and available())
    assert (model.lean_forward is not None) == fast_forward
    accepted = 0
    for seed in range(3):
        prompt = torch.randint(0, 16, (1, 5 + seed), generator=torch.Generator().manual_seed(seed))
        ref = hf_greedy(base, prompt, 24)
        assert len(ref) == 24
        for mode in ("ar", "spec", "tree"):
            out = generate(model, prompt, 24, mode=mode)
            assert out.tokens[0] == ref, (mode, seed)
            accepted += sum(out.stats.accepted_histogram[1:])
    assert accepted > 0


@pytest.mark.parametrize("head_type", ["residual", "sequential"])
def test_draft_logits_equal_teacher_forced_heads(head_type):
    model = wrapped(tiny_llama(), head_type)
    seq = torch.randint(0, 64, (1, 24))
    with torch.no_grad():
        full = model(seq)  # (1, T, 4, V)
    state = model.new_state(1, 48)
    torch.testing.assert_close(model.verify(state, seq[:, :9]), full[:, :9, 0], atol=1e-5, rtol=1e-4)
    model.accept(state, None, torch.tensor([9]))
    for length, accept in ((9, 2), (11, 4)):
        _, logits = model.draft(state, seq[:, length], 3, lambda lg, j: seq[:, length + 1 + j])
        torch.testing.assert_close(logits[0], full[0, length - 1, 1:], atol=1e-5, rtol=1e-4)
        model.verify(state, seq[:, length:length + 4])
        model.accept(state, None, torch.tensor([accept]))


def test_sampling_path_runs():
    model = wrapped(tiny_llama(), "residual")
    out = generate(model, torch.tensor([[1, 2, 3]]), 12, mode="spec", temperature=0.8, top_p=0.9, seed=0)
    assert len(out.tokens[0]) == 12


def test_heads_save_load_round_trip_and_mismatch(tmp_path):
    base = tiny_llama()
    model = wrapped(base, "sequential")
    model.identity = {"name": "tiny", "fingerprint": "abc"}
    model.save_heads(tmp_path / "heads")
    assert (tmp_path / "heads" / "heads.safetensors").stat().st_size < 2_000_000
    loaded = MTPHeadsForCausalLM.from_heads(base, tmp_path / "heads", {"fingerprint": "abc"})
    seq = torch.randint(0, 64, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(seq), model(seq))
    with pytest.raises(HeadsMismatchError, match="fingerprint"):
        MTPHeadsForCausalLM.from_heads(base, tmp_path / "heads", {"fingerprint": "other"})
    with pytest.raises(HeadsMismatchError, match="vocab_size"):
        MTPHeadsForCausalLM.from_heads(tiny_llama(vocab=80), tmp_path / "heads")
    with pytest.raises(FileNotFoundError, match="heads directory"):
        MTPHeadsForCausalLM.from_heads(base, tmp_path)


def test_bad_head_type_is_refused():
    with pytest.raises(ValueError, match="head_type"):
        MTPHeadsForCausalLM(tiny_llama(), 3, "transformer")


def test_verify_last_scores_the_last_prompt_positions_as_verify_does():
    """The prefill path that skips the vocabulary head on all but each row's last prompt token."""
    base = tiny_llama(vocab=16)
    prompts = torch.randint(0, 16, (3, 7), generator=torch.Generator().manual_seed(0))
    last = torch.tensor([6, 3, 5])
    results = []
    for method in ("verify", "verify_last"):
        model = wrapped(base, "sequential")
        model.kernel_min_rows = 1
        state = model.new_state(3, 16)
        out = model.verify(state, prompts) if method == "verify" else model.verify_last(state, prompts, last)
        model.accept(state, None, last + 1)
        results.append((out, model.verify(state, prompts[:, :1])))  # the cache it left behind
    full, rows = results[0][0], torch.arange(3)
    torch.testing.assert_close(results[1][0], full[rows, last], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], atol=1e-5, rtol=1e-5)
