"""Head training on a hidden-state cache of a tiny random HF Llama (no network, seconds)."""
import json

import numpy as np
import pytest
import torch
from conftest import hf_greedy

pytest.importorskip("transformers")
from hf_fixtures import TEXTS, make_model, make_tokenizer  # noqa: E402

from multitoken.decoding import generate  # noqa: E402
from multitoken.data import training_texts  # noqa: E402
from multitoken.model.targets import IGNORE_INDEX as IGNORE  # noqa: E402
from multitoken.training import HeadsTrainConfig, HeadsTrainError, train_heads  # noqa: E402
from multitoken.training.draft_vocab import draft_vocab_from_cache, draft_vocab_from_counts, vocab_index  # noqa: E402
from multitoken.training.head_stats import (evaluate_heads, head_statistics, head_targets, soft_ce,  # noqa: E402
                                            split_rows)
from multitoken.hf import DraftVocabHead, MTPHeadsForCausalLM, build_hidden_cache  # noqa: E402
from multitoken.hf.doc_packing import PROMPT, TEXT  # noqa: E402
from multitoken.hf.hidden_cache import CachedRows  # noqa: E402

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant{% endif %}")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    model, tok = make_model(), make_tokenizer()
    path = tmp_path_factory.mktemp("hc") / "cache"
    return model, tok, build_hidden_cache(model, tok, TEXTS, path, seq_len=32, batch_size=8, progress=False)


def test_head_targets_corpus_and_distill():
    tokens = torch.tensor([[10, 11, 12, 13]])
    greedy = torch.tensor([[20, 21, 22, 23]])
    corpus = head_targets(tokens, greedy, 3, "corpus")
    assert corpus[0].tolist() == [[11, 12, 13, IGNORE]]
    assert corpus[2].tolist() == [[13, IGNORE, IGNORE, IGNORE]]
    distill = head_targets(tokens, greedy, 3, "distill")
    assert distill[0].tolist() == [[20, 21, 22, 23]]  # the base's own next token: head 0 is always right
    assert distill[2].tolist() == [[22, 23, IGNORE, IGNORE]]  # head i at t -> greedy[t+i]
    with pytest.raises(HeadsTrainError, match="targets"):
        head_targets(tokens, greedy, 3, "teacher")


@pytest.mark.parametrize("head_type,targets", [("sequential", "distill"), ("residual", "corpus")])
def test_a_packed_row_trains_as_its_documents_alone(head_type, targets):
    """Statistics of a row of packed documents equal the sums over each document on its own row,
    prompt positions left out (and counted with prompt_loss)."""
    torch.manual_seed(0)
    model = make_model()
    heads = MTPHeadsForCausalLM(model, 4, head_type)
    for p in heads.heads.parameters():
        torch.nn.init.normal_(p, std=0.2)
    lengths, segs = [5, 9, 2, 8], [[PROMPT] * 2 + [TEXT] * 3, [TEXT] * 9, [TEXT] * 2, [PROMPT] * 3 + [TEXT] * 5]
    tokens = torch.randint(2, 40, (1, sum(lengths)))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    segments = torch.tensor([s for seg in segs for s in seg])[None]
    with torch.no_grad():
        hidden = model.model(tokens).last_hidden_state  # stand-in states
        greedy = torch.randint(2, 40, tokens.shape)
    packed = CachedRows(hidden, tokens, greedy, positions, segments)
    for prompt_loss in (False, True):
        row = head_statistics(heads, packed, targets, None, None, grad=False, prompt_loss=prompt_loss)
        ce, count, hits = torch.zeros(4), [0] * 4, [0] * 4
        start = 0
        for n in lengths:  # each document alone, as a plain row (no positions: the causal path)
            h, x, gr, _, seg = (t[:, start:start + n] for t in packed)
            part = CachedRows(h, x, gr, None, seg)
            one = head_statistics(heads, part, targets, None, None, grad=False, prompt_loss=prompt_loss)
            ce += torch.stack(one["ce"])
            count = [a + b for a, b in zip(count, one["count"])]
            hits = [a + b[0] for a, b in zip(hits, one["correct"])]
            start += n
        torch.testing.assert_close(torch.stack(row["ce"]), ce, rtol=1e-4, atol=1e-4)
        assert row["count"] == count and [h for h, _ in row["correct"]] == hits
        if targets == "distill":  # head 0 scores every trained position: the answers, or all with prompt_loss
            assert count[0] == (segments != 0 if prompt_loss else segments == TEXT).sum()


def test_draft_vocab_mapping(cache):
    counts = np.array([5, 0, 9, 9, 1, 7])
    assert draft_vocab_from_counts(counts, 3).tolist() == [2, 3, 5]  # most frequent, ties by lower id
    assert draft_vocab_from_counts(counts, 3, always=[1]).tolist() == [1, 2, 3]
    index = vocab_index(torch.tensor([2, 3, 5]), 6)
    assert index.tolist() == [IGNORE, IGNORE, 0, 1, IGNORE, 2]
    _, _, c = cache
    ids, coverage = draft_vocab_from_cache(c, 8)
    greedy = np.asarray(c.greedy)[np.asarray(c.segments) == TEXT]  # not the padding
    assert len(ids) == 8 and coverage == pytest.approx(np.isin(greedy, ids).mean())
    # the decoding head: logits over the draft ids, -inf elsewhere, equal to the full head there
    w = torch.randn(16, 4)
    head = DraftVocabHead(w, torch.tensor([1, 4, 9]))
    g = torch.randn(2, 4)
    full = head(g)
    assert full.shape == (2, 16) and torch.isinf(full[:, [0, 2, 15]]).all()
    torch.testing.assert_close(full[:, [1, 4, 9]], g @ w[[1, 4, 9]].T)


@pytest.mark.parametrize("head_type,targets,soft", [("sequential", "distill", 0.0), ("residual", "corpus", 0.0),
                                                    ("sequential", "distill", 0.5)])
def test_training_lowers_head_loss_and_heads_reload(cache, tmp_path, head_type, targets, soft):
    model, tok, c = cache
    heads = MTPHeadsForCausalLM(model, 3, head_type, identity={"name": "tiny", "fingerprint": "f"})
    cfg = HeadsTrainConfig(n_future=3, head_type=head_type, targets=targets, draft_vocab=24, steps=30,
                           batch_size=4, lr=3e-3, warmup=3, eval_every=10, log_every=5, val_rows=0.2,
                           soft_targets=soft)
    train_rows, val_rows = split_rows(c.rows, cfg.val_rows)
    summary = train_heads(heads, c, cfg, tmp_path / "heads", progress=False)
    first, last = summary["first_eval"], summary["eval"]
    assert last["loss"] < (0.85 if soft else 0.8) * first["loss"]  # soft targets keep their entropy
    assert summary["steps"] == 30 and summary["tokens"] == 30 * 4 * 32
    rows = [json.loads(line) for line in (tmp_path / "heads" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("split") != "val"]
    assert [r["step"] for r in train] == [5, 10, 15, 20, 25, 30]
    for key in ("step", "tokens", "lr", "loss", "primary", "auxiliary", "head_losses", "head_accuracy",
                "tokens_per_s"):
        assert key in train[0]
    assert len(train[0]["head_losses"]) == 3
    assert any(r.get("split") == "val" for r in rows)
    # reload: same draft vocabulary, same validation numbers
    meta = json.loads((tmp_path / "heads" / "heads_config.json").read_text())
    assert meta["draft_vocab"] == heads.draft_ids.tolist() and len(meta["draft_vocab"]) == 24
    loaded = MTPHeadsForCausalLM.from_heads(model, tmp_path / "heads", {"fingerprint": "f"})
    assert torch.equal(loaded.draft_ids, heads.draft_ids)
    tree = json.loads((tmp_path / "heads" / "tree.json").read_text())  # from validation top-k hits
    assert 1 <= tree["num_nodes"] <= cfg.tree_budget and len(tree["acceptance"]) == 2
    again = evaluate_heads(loaded, c, val_rows, cfg, loaded.draft_ids, vocab_index(loaded.draft_ids, 64))
    assert again["head_losses"] == pytest.approx(last["head_losses"], rel=1e-5)


@pytest.mark.parametrize("head_type", ["residual", "sequential"])
def test_greedy_identity_with_a_draft_vocabulary(head_type):
    base = make_model(vocab=16, eos=None)  # no EOS: min_new_tokens would mask it in base.generate
    model = MTPHeadsForCausalLM(base, 4, head_type)
    for p in model.heads.parameters():
        if p.dim() > 1:
            torch.nn.init.normal_(p, std=0.3)
    model.set_draft_vocab([0, 2, 3, 5, 7, 8, 11, 13])
    accepted = 0
    for seed in range(3):
        prompt = torch.randint(0, 16, (1, 5 + seed), generator=torch.Generator().manual_seed(seed))
        ref = hf_greedy(base, prompt, 20, min_new_tokens=20)
        for mode in ("ar", "spec", "tree"):
            out = generate(model, prompt, 20, mode=mode)
            assert out.tokens[0] == ref, (mode, seed)
            accepted += sum(out.stats.accepted_histogram[1:])
        state = model.new_state(1, 64)
        model.verify(state, prompt)
        model.accept(state, None, torch.tensor([prompt.shape[1]]))
        drafts, logits = model.draft(state, torch.tensor([1]), 3, lambda lg, j: lg.argmax(-1))
        assert set(drafts[0].tolist()) <= {0, 2, 3, 5, 7, 8, 11, 13}
        assert torch.isinf(logits[0][:, [1, 4, 6]]).all()
    assert accepted > 0
    out = generate(model, torch.tensor([[1, 2, 3]]), 10, mode="spec", temperature=0.8, seed=0)  # sampling runs
    assert len(out.tokens[0]) == 10


def test_soft_targets_are_the_base_distribution_at_the_target_position(cache):
    model, _, c = cache
    heads = MTPHeadsForCausalLM(model, 3, "sequential")
    ids = torch.arange(0, 64, 2)
    heads.set_draft_vocab(ids)
    index = vocab_index(heads.draft_ids, 64)
    h, x, gr, _, seg = c.get([0, 1])
    rows = CachedRows(h, x, gr, torch.arange(32).expand(2, 32), seg)  # one document per row
    hard = head_statistics(heads, rows, "distill", heads.draft_ids, index, grad=False)
    soft = head_statistics(heads, rows, "distill", heads.draft_ids, index, grad=False, soft=1.0)
    half = head_statistics(heads, rows, "distill", heads.draft_ids, index, grad=False, soft=0.5)
    gs = heads.head_hiddens_from(h, x)
    W = model.lm_head.weight[ids]  # (N, d)
    for i in (1, 2):
        t = gr[:, i:]  # head i at t -> greedy[t+i], from the base's distribution at t+i
        keep = index[t] != IGNORE
        teacher = (h[:, i:][keep] @ W.T).softmax(-1)
        expect = -(teacher * torch.log_softmax(gs[i][:, :-i][keep] @ W.T, -1)).sum()
        torch.testing.assert_close(soft["ce"][i], expect, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(half["ce"][i], (hard["ce"][i] + soft["ce"][i]) / 2, rtol=1e-5, atol=1e-4)
    assert soft["ce"][0] == hard["ce"][0] and soft["correct"] == hard["correct"]  # head 0, hits: unchanged
    # one-hot target distributions give the hard CE; rows whose hard target is ignored are left out
    logits, targets = torch.randn(5, 7), torch.tensor([1, 0, IGNORE, 6, 2])
    onehot = torch.nn.functional.one_hot(targets.clamp(min=0), 7).float()
    torch.testing.assert_close(soft_ce(logits, onehot, targets),
                               torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="sum"))


def test_soft_targets_need_distill_targets(cache, tmp_path):
    model, _, c = cache
    with pytest.raises(HeadsTrainError, match="soft_targets"):
        HeadsTrainConfig(soft_targets=1.5)
    cfg = HeadsTrainConfig(n_future=3, targets="corpus", soft_targets=0.5, steps=1, batch_size=2)
    with pytest.raises(HeadsTrainError, match="soft-targets"):
        train_heads(MTPHeadsForCausalLM(model, 3, "sequential"), c, cfg, tmp_path / "h", progress=False)


def test_bad_config_and_texts():
    with pytest.raises(HeadsTrainError, match="head type"):
        HeadsTrainConfig(head_type="medusa")
    with pytest.raises(HeadsTrainError, match="linear"):
        HeadsTrainConfig(head_type="linear", draft_vocab=100)
    with pytest.raises(HeadsTrainError, match="n_future"):
        HeadsTrainConfig(n_future=1)
    texts = list(zip(range(7), training_texts(["<stdlib>", "<prose>"], max_chars=100)))
    assert len(texts) == 7 and all(0 < len(t) <= 100 for _, t in texts)


def test_cli_heads_train_and_bench(tmp_path, capsys):
    from multitoken.cli.main import main
    base = tmp_path / "base"
    make_model(eos=1).save_pretrained(base)
    tok = make_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(base)
    data = tmp_path / "text.txt"
    data.write_text("\n".join(TEXTS))
    out = tmp_path / "heads"
    rc = main(["heads", "train", "--base", str(base), "--data", str(data), "--out", str(out), "--steps", "4",
               "--max-tokens", "512", "--seq-len", "32", "--draft-vocab", "16", "--n-future", "3", "--quiet",
               "--generate-distill", "24"])
    assert rc == 0 and "heads saved" in capsys.readouterr().out
    assert (out / "heads.safetensors").is_file() and (out / "hidden_cache" / "meta.json").is_file()
    assert len(json.loads((out / "heads_config.json").read_text())["draft_vocab"]) == 16
    prose = tmp_path / "prose.txt"
    prose.write_text("# comment\nthe a of to and\nis it that this\n")
    rc = main(["heads", "bench", "--base", str(base), "--heads", str(out), "--code-prompts", "1", "--prose",
               str(prose), "--per-group", "1", "--max-new-tokens", "6", "--json", str(tmp_path / "b.json"), "--quiet"])
    result = json.loads((tmp_path / "b.json").read_text())
    assert rc == 0, capsys.readouterr()
    groups = {(r["group"], r["decoder"]) for r in result["rows"]}
    assert ("prose", "spec") in groups and ("code", "hf_pld") in groups and ("all", "tree") in groups
    assert all(r["identical"] for r in result["rows"])
    # the spelling: `bench decode --base`, the packaged requests, verify cost with and without the kernels
    rc = main(["bench", "decode", "--base", str(base), "--heads", str(out), "--code-prompts", "1", "--per-group",
               "1", "--max-new-tokens", "4", "--modes", "ar", "spec", "--draft-cost", "0.1",
               "--json", str(tmp_path / "d.json")])
    result = json.loads((tmp_path / "d.json").read_text())
    assert rc == 0 and {r["decoder"] for r in result["rows"]} == {"hf", "hf_pld", "ar", "spec", "spec_adaptive"}
    assert all(r["identical"] for r in result["rows"])
    assert {r["group"] for r in result["rows"]} == {"code", "complete", "prose", "continue", "all"}
    assert [v["width"] for v in result["verify_cost"]] == [1, 2, 3, 4, 8, 16]
    assert all(v["hf_seconds"] > 0 for v in result["verify_cost"])
    assert not (tmp_path / "d.json.partial").exists()
    # bad input: one line, exit 2
    assert main(["heads", "train", "--base", str(base), "--out", str(out), "--head-type", "linear"]) == 2
    assert "linear" in capsys.readouterr().err


@pytest.mark.parametrize("fast_forward", [True, False])
def test_repeated_verify_without_accept_is_idempotent(fast_forward):
    """verify_cost_by_width times verify passes that are never accepted: the cache must not grow
    (static KV cache of the lean forward, and HF's DynamicCache)."""
    base = make_model(vocab=16, eos=None)
    model = MTPHeadsForCausalLM(base, 3, "residual", fast_forward=fast_forward)
    assert (model.lean_forward is not None) == fast_forward
    prompt = torch.randint(0, 16, (1, 6), generator=torch.Generator().manual_seed(0))
    state = model.new_state(1, 32)
    model.verify(state, prompt)
    model.accept(state, None, torch.tensor([6]))
    block = torch.tensor([[3, 4, 5]])
    first = model.verify(state, block)
    again = model.verify(state, block)
    torch.testing.assert_close(first, again)
    model.accept(state, None, torch.tensor([3]))
    assert (int(state.cache.lengths[0]) if fast_forward else state.cache.rows[0].hf.get_seq_length()) == 9
