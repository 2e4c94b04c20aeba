"""The vocabulary screen: a bfloat16 screen plus float32 logits where the maximum can be gives the
float32 argmax; the HF wrapper uses it in greedy passes only."""
import pytest
import torch
import torch.nn.functional as F
from conftest import hf_greedy
from hf_fixtures import ARCHS, make_arch
from hypothesis import given, settings
from hypothesis import strategies as st

from multitoken.decoding import generate
from multitoken.hf import MTPHeadsForCausalLM
from multitoken.hf.vocab_screen import OUTPUT_ROUNDOFF, VocabScreen, fast_bf16_available
from multitoken.model.protocol import greedy_verify, greedy_verify_active

KERNELS = [False] + ([True] if fast_bf16_available() else [])  # F.linear in bfloat16; oneDNN where native


def screen_case(seed: int, vocab: int, d: int, rows: int, scale: float, tie: float):
    """(weight (V, d), hidden (N, d)): random, hidden norms like SmolLM2's final states (~47); for
    ``tie`` > 0 each row's top token gets rivals whose logits differ from it by about ``tie``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(vocab, d, generator=g) * scale
    h = torch.randn(rows, d, generator=g) * (47 / d ** 0.5)
    if tie > 0:
        top = F.linear(h, w).argmax(-1)
        for r in range(rows):
            rival = (int(top[r]) + 1 + r) % vocab
            w[rival] = w[top[r]] + tie * torch.randn(d, generator=g) / (47 * d ** 0.5)
    return w, h


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), vocab=st.integers(2, 300), d=st.sampled_from([8, 64, 576]),
       rows=st.integers(1, 9), scale=st.sampled_from([1e-3, 0.05, 1.0, 30.0]),
       tie=st.sampled_from([0.0, 1e-2, 1e-4, 1e-6]), onednn=st.sampled_from(KERNELS))
def test_the_screen_keeps_the_float32_argmax(seed, vocab, d, rows, scale, tie, onednn):
    w, h = screen_case(seed, vocab, d, rows, scale, tie)
    screen = VocabScreen(w, onednn=onednn)
    exact = F.linear(h, w)  # (N, V): what the base head computes
    got = screen.logits(h)
    # The bound holds for every entry of the screen.
    s = screen.screen(h.bfloat16())
    e0 = screen.error_bound(h, h.bfloat16())
    assert bool(((s - exact).abs() <= e0[:, None] + OUTPUT_ROUNDOFF * s.abs()).all())
    # The argmax is the float32 one (up to a last-bit tie in float32 itself), held as a float32 logit.
    pick = got.argmax(-1)
    picked = exact.gather(1, pick[:, None])[:, 0]
    top = exact.amax(-1)
    assert bool((picked >= top - 1e-5 * top.abs().clamp(min=1)).all())
    assert torch.allclose(got.gather(1, pick[:, None])[:, 0], picked, rtol=1e-5, atol=1e-6)
    # Candidates hold float32 logits; the entries the screen left alone lie below the maximum.
    candidate = s >= screen.threshold(s.amax(-1), e0)[:, None]
    assert torch.allclose(got[candidate], exact[candidate], rtol=1e-5, atol=1e-6)
    assert bool((got[~candidate] < top[:, None].expand_as(got)[~candidate]).all())


def test_candidates_are_few_and_a_changed_weight_is_picked_up():
    w, h = screen_case(0, 4096, 64, 16, 1.0, 0.0)
    screen = VocabScreen(w, onednn=False)
    s = screen.screen(h.bfloat16())
    threshold = screen.threshold(s.amax(-1), screen.error_bound(h, h.bfloat16()))
    assert int((s >= threshold[:, None]).sum()) < 16 * 8  # a handful per position, not the vocabulary
    assert torch.equal(screen.logits(h).argmax(-1), F.linear(h, w).argmax(-1))
    with torch.no_grad():
        w.mul_(-1)  # in place: the bfloat16 copy must follow
    assert torch.equal(screen.logits(h).argmax(-1), F.linear(h, w).argmax(-1))


def test_the_screen_needs_a_float32_matrix():
    with pytest.raises(ValueError, match="float32"):
        VocabScreen(torch.zeros(4, 3, dtype=torch.bfloat16))


def test_greedy_verify_nests_and_restores():
    assert not greedy_verify_active()
    with greedy_verify():
        assert greedy_verify_active()
        with greedy_verify(False):
            assert not greedy_verify_active()
        assert greedy_verify_active()
    assert not greedy_verify_active()


VOCAB = 16


def screened(base, head_type="sequential", **kw):
    model = MTPHeadsForCausalLM(base, 4, head_type, vocab_screen=True, **kw)
    for p in model.heads.parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.3)
    calls = []
    logits = model.vocab_screen.logits
    model.vocab_screen.logits = lambda hidden: calls.append(hidden.shape) or logits(hidden)
    return model, calls


@settings(max_examples=8, deadline=None)
@given(arch=st.sampled_from(ARCHS), head_type=st.sampled_from(["residual", "sequential"]),
       seed=st.integers(0, 10_000), lengths=st.lists(st.integers(1, 10), min_size=1, max_size=3))
def test_greedy_decoding_through_the_screen_equals_base_generate(arch, head_type, seed, lengths):
    """ar / spec / tree, one prompt and ragged batches, with every base-head product screened."""
    base = make_arch(arch, seed, vocab=VOCAB)
    torch.manual_seed(seed)
    model, calls = screened(base, head_type)
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, VOCAB, (n,), generator=g) for n in lengths]
    refs = [hf_greedy(base, r[None], 12) for r in rows]
    for mode in ("ar", "spec", "tree"):
        calls.clear()
        assert generate(model, rows, 12, mode=mode).tokens == refs, mode
        assert calls, f"{mode} did not go through the screen"


def test_sampling_and_plain_verify_get_every_float32_logit():
    base = make_arch("llama", 2, vocab=VOCAB)
    model, calls = screened(base, "residual")
    plain = MTPHeadsForCausalLM(base, 4, "residual", vocab_screen=False)
    assert plain.vocab_screen is None
    tokens = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    a, b = model.new_state(2, 16), plain.new_state(2, 16)
    assert torch.equal(model.verify(a, tokens), plain.verify(b, tokens)) and not calls
    out = generate(model, [tokens[0]], 6, mode="spec", temperature=0.7, seed=0, cost_model="off")
    assert len(out.tokens[0]) == 6 and not calls  # sampling reads every logit: no screen
    with greedy_verify():
        model.crop(a, torch.zeros(2, dtype=torch.long))
        assert torch.equal(model.verify(a, tokens).argmax(-1), plain.verify(b, tokens).argmax(-1)) and calls


def test_no_screen_for_a_bfloat16_base():
    model = MTPHeadsForCausalLM(make_arch("llama", 0, vocab=VOCAB).to(torch.bfloat16), 2, "residual",
                                vocab_screen=True)
    assert model.vocab_screen is None


def test_a_model_cast_to_bfloat16_after_construction_keeps_the_plain_head():
    model, calls = screened(make_arch("llama", 0, vocab=VOCAB), "residual")
    model.to(torch.bfloat16)
    with greedy_verify():
        logits = model.verify(model.new_state(1, 8), torch.zeros(1, 3, dtype=torch.long))
    assert logits.shape == (1, 3, VOCAB) and not calls
