"""Tree tuning: measured top-k acceptance, the tuned tree, saving and loading it."""
import json

import pytest
import torch

from multitoken.decoding import (
    DEFAULT_PRESET, generate, load_tree, measure_topk_acceptance, resolve_tree, save_tree, tree_preset, tune_tree,
    validate_tree,
)
from conftest import tiny_model

def test_measured_acceptance_matches_teacher_forced_heads():
    model = tiny_model("residual", n_future=4, seed=5, vocab_size=8)
    prompt = torch.tensor([3, 1, 4, 1, 5])
    n = 12
    acc = measure_topk_acceptance(model, [prompt], num_draft=3, top_k=4, max_new_tokens=n)
    assert acc.shape == (3, 4) and bool(((acc >= 0) & (acc <= 1)).all()) and bool((acc.sum(1) <= 1 + 1e-9).all())
    gen = generate(model, prompt[None], n).tokens[0]
    with torch.no_grad():
        full = model(torch.cat([prompt, torch.tensor(gen)])[None])[0]  # (T, n_future, V)
    P = len(prompt)
    for j in range(1, 4):
        hits, total = torch.zeros(4), 0
        for s in range(n - 1):
            if s + j < n:
                cand = full[P - 1 + s, j].topk(4).indices
                hits += (cand == gen[s + j]).float()
                total += 1
        torch.testing.assert_close(acc[j - 1].float(), hits / total)


def test_tune_save_load_and_default(tmp_path):
    model = tiny_model("residual", n_future=4, seed=6, vocab_size=8)
    prompts = [torch.tensor([1, 2, 3]), torch.tensor([4, 5])]
    paths = tune_tree(model, prompts, budget=6, max_new_tokens=10)
    assert 1 <= len(paths) <= 6
    validate_tree(paths, 3)
    assert load_tree(tmp_path) is None
    assert resolve_tree(None, tmp_path, 3) == tree_preset(DEFAULT_PRESET, 3)
    acc = measure_topk_acceptance(model, prompts, top_k=6, max_new_tokens=10)
    torch.testing.assert_close(acc, measure_topk_acceptance(model, prompts, top_k=6, max_new_tokens=10, batch_size=1))
    f = save_tree(paths, tmp_path, acceptance=acc, budget=6)
    record = json.loads(f.read_text())
    assert record["paths"] == paths and record["budget"] == 6 and record["expected_tau"] >= 1
    assert load_tree(tmp_path) == paths and resolve_tree(None, tmp_path, 3) == paths
    assert resolve_tree("chain", tmp_path, 3) == [[0], [0, 0], [0, 0, 0]]  # an explicit tree wins
    out = generate(model, [prompts[0]], 12, mode="tree", tree=str(tmp_path))
    assert out.tokens == generate(model, [prompts[0]], 12).tokens
    f.write_text("{not json")
    with pytest.raises(ValueError, match="corrupt tree file"):
        load_tree(tmp_path)
    f.write_text(json.dumps({"paths": [[0, 0]]}))
    with pytest.raises(ValueError, match="corrupt tree file.*no parent"):
        load_tree(tmp_path)
