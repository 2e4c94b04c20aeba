"""Training the base's top layers with the heads (full or LoRA): cache layer, training, save/load, identity."""
import pytest
import torch
from conftest import hf_greedy

pytest.importorskip("transformers")

from multitoken.hf import (BaseAdaptationError, MTPHeadsForCausalLM, build_hidden_cache, hidden_at_layer,  # noqa: E402
                          run_top_layers)
from multitoken.decoding import generate  # noqa: E402
from multitoken.training import HeadsTrainConfig, HeadsTrainError, train_heads  # noqa: E402

from hf_fixtures import TEXTS, make_model, make_tokenizer  # noqa: E402

MODES = [(1, 0), (1, 4)]  # (train_base_layers, lora_rank): a full top layer; LoRA on it
IDS = ["full-layer", "lora"]


def needs_peft(rank):
    if rank:
        pytest.importorskip("peft")


@pytest.mark.parametrize("layers,rank", MODES, ids=IDS)
def test_only_the_top_layers_train_and_replaying_them_matches_the_base(layers, rank):
    needs_peft(rank)
    base = make_model(eos=None)
    model = MTPHeadsForCausalLM(base, 3, "sequential", train_base_layers=layers, lora_rank=rank)
    trainable = [n for n, p in base.named_parameters() if p.requires_grad]
    if rank:
        assert trainable and all("lora_" in n and ".layers.1." in n for n in trainable)
    else:
        assert set(trainable) == {n for n, _ in base.named_parameters() if ".layers.1." in n or n == "model.norm.weight"}
    assert model.cache_layer == 1
    tokens = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        final = base.model(input_ids=tokens).last_hidden_state
        replayed = run_top_layers(base, model.base_hidden(tokens), layers)
        # two documents packed in one row replay as each alone
        positions = torch.cat([torch.arange(5), torch.arange(7)])[None].expand(2, -1)
        packed = run_top_layers(base, hidden_at_layer(base, tokens, 1, positions)[0], layers, positions)
        first = base.model(input_ids=tokens[:, :5]).last_hidden_state
        second = base.model(input_ids=tokens[:, 5:]).last_hidden_state
    torch.testing.assert_close(replayed, final, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed, torch.cat([first, second], 1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layers,rank", MODES, ids=IDS)
def test_adapted_training_save_load_and_greedy_identity(layers, rank, tmp_path):
    needs_peft(rank)
    base, tok = make_model(eos=None), make_tokenizer()
    model = MTPHeadsForCausalLM(base, 3, "sequential", train_base_layers=layers, lora_rank=rank,
                                identity={"name": "tiny", "fingerprint": "f"})
    cache = build_hidden_cache(base, tok, TEXTS, tmp_path / "cache", seq_len=32, progress=False,
                               layer=model.cache_layer)
    assert cache.layer == 1
    before = {n: p.detach().clone() for n, p in base.named_parameters() if p.requires_grad}
    cfg = HeadsTrainConfig(n_future=3, head_type="sequential", draft_vocab=24, steps=25, batch_size=4, lr=3e-3,
                           warmup=3, eval_every=25, val_rows=0.2)
    summary = train_heads(model, cache, cfg, tmp_path / "heads", progress=False)
    assert summary["eval"]["loss"] < 0.8 * summary["first_eval"]["loss"]
    assert any(not torch.equal(before[n], p) for n, p in base.named_parameters() if p.requires_grad)
    # a fresh copy of the original base + the saved directory = the adapted model, bit for bit
    loaded = MTPHeadsForCausalLM.from_heads(make_model(eos=None), tmp_path / "heads", {"fingerprint": "f"})
    assert loaded.adaptation == {"layers": layers, "lora_rank": rank}
    prompt = torch.tensor([[3, 9, 4, 17, 5]])
    with torch.no_grad():
        assert torch.equal(loaded.base(prompt).logits, base(prompt).logits)
    ref = hf_greedy(loaded.base, prompt, 16)
    for mode in ("spec", "tree"):
        assert generate(loaded, prompt, 16, mode=mode).tokens[0] == ref


def test_bad_adaptations_are_refused(tmp_path):
    with pytest.raises(BaseAdaptationError, match="train_base_layers"):
        MTPHeadsForCausalLM(make_model(), 3, "residual", train_base_layers=5)
    with pytest.raises(BaseAdaptationError, match="lora_rank needs"):
        MTPHeadsForCausalLM(make_model(), 3, "residual", lora_rank=4)
    base = make_model()
    final_cache = build_hidden_cache(base, make_tokenizer(), TEXTS[:4], tmp_path / "c", seq_len=32, progress=False)
    model = MTPHeadsForCausalLM(base, 3, "residual", train_base_layers=1)
    with pytest.raises(HeadsTrainError, match="layer"):
        train_heads(model, final_cache, HeadsTrainConfig(n_future=3, head_type="residual", steps=1, draft_vocab=0))


def test_missing_peft_names_the_install(monkeypatch):
    import multitoken.hf.loading as loading
    from multitoken.errors import MultitokenError
    real = loading._find_spec
    monkeypatch.setattr(loading, "_find_spec", lambda name: None if name == "peft" else real(name))
    with pytest.raises(MultitokenError, match="pip install peft"):
        MTPHeadsForCausalLM(make_model(), 3, "residual", train_base_layers=1, lora_rank=4)
