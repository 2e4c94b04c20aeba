"""The HF-style API: MTPHeadsForCausalLM.from_pretrained(base, heads) and model.generate(input_ids, ...)."""
import pytest
import torch
from hf_fixtures import make_arch, make_model, make_tokenizer

transformers = pytest.importorskip("transformers")

from multitoken.errors import MultitokenError  # noqa: E402
from multitoken.hf import HeadsMismatchError, MTPHeadsForCausalLM, load_heads_model  # noqa: E402
from multitoken.hf.generation import hf_style_output, prompt_rows  # noqa: E402
from multitoken.hf.loading import save_causal_lm  # noqa: E402

VOCAB = 16


def heads_on(base, tmp_path, head_type="sequential"):
    """Random heads for ``base`` saved to tmp_path/heads (identity recorded); returns the folder."""
    model = MTPHeadsForCausalLM(base, 4, head_type)
    for p in model.heads.parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.3)
    from multitoken.hf import model_identity
    model.identity = model_identity(base)
    return model.save_heads(tmp_path / "heads")


def left_padded(rows, pad):
    """(input_ids, attention_mask) of 1-D rows, left-padded with ``pad`` as HF tokenizers do."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    return ids, mask


def test_generate_equals_base_generate_batched_with_left_padding(tmp_path):
    base = make_arch("llama", 5, vocab=VOCAB)
    model = MTPHeadsForCausalLM.from_pretrained(base, heads_on(base, tmp_path))
    g = torch.Generator().manual_seed(5)
    ids, mask = left_padded([torch.randint(1, VOCAB, (n,), generator=g) for n in (3, 8, 5)], pad=0)
    ref = base.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    for mode in ("tree", "spec", "ar"):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=12, mode=mode)
        assert out.dtype == torch.long and torch.equal(out, ref), mode


def test_rows_after_eos_are_padded_like_hf(tmp_path):
    base = make_arch("qwen2", 6, vocab=VOCAB)
    model = MTPHeadsForCausalLM.from_pretrained(base, heads_on(base, tmp_path, "residual"))
    g = torch.Generator().manual_seed(6)
    ids, mask = left_padded([torch.randint(1, VOCAB, (n,), generator=g) for n in (4, 7)], pad=0)
    free = base.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    eos = int(free[0, ids.shape[1] + 2])  # row 0 stops at its third new token (or earlier)
    ref = base.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, eos_token_id=eos,
                        pad_token_id=15)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=eos, pad_token_id=15)
    assert torch.equal(out, ref)


def test_sampling_runs_and_keeps_the_input():
    base = make_arch("mistral", 7, vocab=VOCAB)
    model = MTPHeadsForCausalLM(base, 3, "residual")
    ids, mask = left_padded([torch.tensor([3, 4]), torch.tensor([5, 6, 7, 8])], pad=0)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=True, temperature=0.7, top_p=0.9,
                         top_k=5, mode="spec", seed=1)
    assert out.shape == (2, 4 + 6) and torch.equal(out[:, :4], ids)
    with pytest.raises(MultitokenError, match="temperature"):
        model.generate(ids, do_sample=True, temperature=0.0)


def test_prompt_rows_and_output_shapes():
    ids = torch.tensor([[0, 0, 5, 6], [1, 2, 3, 4]])
    rows = prompt_rows(ids, torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]]))
    assert [r.tolist() for r in rows] == [[5, 6], [1, 2, 3, 4]]
    assert [r.tolist() for r in prompt_rows(torch.tensor([7, 8]), None)] == [[7, 8]]
    with pytest.raises(MultitokenError, match="attention_mask"):
        prompt_rows(ids, torch.ones(2, 3))
    assert hf_style_output(ids, [[9], [9, 9, 1]], 0).tolist() == [[0, 0, 5, 6, 9, 0, 0], [1, 2, 3, 4, 9, 9, 1]]


def test_from_pretrained_checks_the_base_and_resolves_heads(tmp_path):
    base = make_model(seed=0)
    heads = heads_on(base, tmp_path)
    model = MTPHeadsForCausalLM.from_pretrained(base, heads, tokenizer=make_tokenizer())
    assert model.heads_dir == heads and model.tokenizer is not None and not model.training
    other = make_model(seed=1)  # same shapes, other weights: another fingerprint
    with pytest.raises(HeadsMismatchError, match="fingerprint"):
        MTPHeadsForCausalLM.from_pretrained(other, heads)
    with pytest.raises(MultitokenError, match="no ready-made heads"):
        MTPHeadsForCausalLM.from_pretrained(other)  # no shipped set was trained for it
    folder = save_causal_lm(base, make_tokenizer(), tmp_path / "base")
    loaded, tokenizer = load_heads_model(str(folder), str(heads))
    assert tokenizer.eos_id == 1 and loaded.identity["fingerprint"] == model.identity["fingerprint"]
    with pytest.raises(MultitokenError, match="no ready-made heads for base"):
        load_heads_model(str(folder), None)  # checked before the base loads
    with pytest.raises(HeadsMismatchError, match="fingerprint"):
        MTPHeadsForCausalLM.from_pretrained(str(save_causal_lm(other, make_tokenizer(), tmp_path / "other")), heads)
