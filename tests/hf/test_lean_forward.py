"""The lean decode forward reproduces the HF forward of Llama-family models, block by block."""
import pytest
import torch
from conftest import hf_greedy
from hf_fixtures import ARCH_SIZES, make_arch
from hypothesis import given, settings
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, MistralConfig, MistralForCausalLM  # noqa: E402

from multitoken.decoding import generate  # noqa: E402
from multitoken.hf import (  # noqa: E402
    LeanDecoderForward, MTPHeadsForCausalLM, block_kernels, lean_forward_unsupported)

def test_which_bases_qualify():
    for arch in ("llama", "mistral", "qwen2"):
        assert lean_forward_unsupported(make_arch(arch)) is None
    windowed = MistralForCausalLM(MistralConfig(**ARCH_SIZES, sliding_window=16))
    assert "sliding" in lean_forward_unsupported(windowed)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=32, n_layer=1, n_head=2, initializer_range=0.5)).eval()
    assert "gpt2" in lean_forward_unsupported(gpt2)
    with pytest.raises(ValueError, match="no lean decode forward"):
        LeanDecoderForward(gpt2)
    gpt2.generation_config.eos_token_id = None
    fallback = MTPHeadsForCausalLM(gpt2, 3, "sequential")
    assert fallback.lean_forward is None  # HF forward and DynamicCache instead
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    ref = hf_greedy(gpt2, ids, 12, pad_token_id=0)
    assert [generate(fallback, ids, 12, mode=m).tokens[0] for m in ("spec", "tree")] == [ref, ref]


@settings(max_examples=12, deadline=None)
@given(arch=st.sampled_from(["llama", "mistral", "qwen2"]), seed=st.integers(0, 10_000),
       prompt=st.integers(1, 20), block=st.integers(1, 6), fast=st.booleans())
def test_blocks_match_the_hf_forward(arch, seed, prompt, block, fast):
    """Prefill, a chain block, a rollback and a tree block over the static cache give the hidden
    states of HF's full forward on the same tokens (tree nodes: on their root path)."""
    from multitoken.hf import install_block_linears
    base = make_arch(arch, seed)
    if fast:
        install_block_linears(base)
    lean = LeanDecoderForward(base)
    gen = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, 32, (1, prompt + block), generator=gen)
    with torch.no_grad():
        full = base.model(input_ids=seq).last_hidden_state  # (1, T, d)
        cache = lean.new_cache(1, 64, torch.float32, "cpu")
        with block_kernels(fast):
            out = lean(seq[:, :prompt], cache)
            cache.commit(None, torch.tensor([prompt]))
            torch.testing.assert_close(out, full[:, :prompt], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(lean(seq[:, prompt:], cache), full[:, prompt:], atol=1e-5, rtol=1e-4)
            # Keep one block token, roll it back, then verify a tree: root, two children, a grandchild.
            cache.commit(None, torch.tensor([1]))
            cache.crop(torch.tensor([prompt]))
            tree = torch.randint(0, 32, (1, 4), generator=gen)
            parents, depths = [-1, 0, 0, 2], torch.tensor([0, 1, 1, 2])
            mask = torch.eye(4, dtype=torch.bool)
            for i, p in enumerate(parents):
                if p >= 0:
                    mask[i] |= mask[p]
            got = lean(tree, cache, depths, mask)
        for i in range(4):
            path = [j for j in range(4) if mask[i, j]]
            ref = base.model(input_ids=torch.cat([seq[:, :prompt], tree[:, path]], 1)).last_hidden_state[:, -1]
            torch.testing.assert_close(got[:, i], ref, atol=1e-5, rtol=1e-4)


@settings(max_examples=10, deadline=None)
@given(arch=st.sampled_from(["llama", "mistral", "qwen2"]), seed=st.integers(0, 10_000),
       prompt=st.integers(1, 12), mode=st.sampled_from(["ar", "spec", "tree"]))
def test_greedy_lean_decoding_equals_base_generate(arch, seed, prompt, mode):
    base = make_arch(arch, seed)
    model = MTPHeadsForCausalLM(base, 4, "sequential")
    assert model.lean_forward is not None
    for p in model.heads.parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.3)
    ids = torch.randint(0, 32, (1, prompt), generator=torch.Generator().manual_seed(seed))
    ref = hf_greedy(base, ids, 20)
    assert generate(model, ids, 20, mode=mode).tokens[0] == ref


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_stock_norms_run_as_their_own_operations_bitwise(arch):
    from multitoken.hf.lean_forward import norm_function
    base = make_arch(arch, 3)
    layer = base.model.layers[0]
    with torch.no_grad():
        layer.input_layernorm.weight.normal_()  # not all ones
        x = torch.randn(2, 5, base.config.hidden_size)
        fn = norm_function(layer.input_layernorm)
        assert fn is not layer.input_layernorm and torch.equal(fn(x), layer.input_layernorm(x))
        layer.input_layernorm.weight.mul_(2.0)  # read at call time, not captured
        assert torch.equal(fn(x), layer.input_layernorm(x))
        xb = x.bfloat16()
        assert torch.equal(fn(xb), layer.input_layernorm(xb))  # other dtypes: the module itself
    other = torch.nn.LayerNorm(8)
    assert norm_function(other) is other
