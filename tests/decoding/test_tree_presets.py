"""Static trees: presets, parsing user input, Medusa's builder, expected accepted length, tree files."""
import pytest

from multitoken.decoding import (
    TREE_PRESETS, build_tree, expected_accept_length, expected_chain_tau, parse_tree, save_tree, tree_preset,
    validate_tree,
)

def test_presets_are_valid_trees_of_their_size():
    for heads in (1, 2, 3, 4):
        for name, size in TREE_PRESETS.items():
            paths = tree_preset(name, heads)
            validate_tree(paths, heads)
            assert len(paths) == (heads if size is None else size)
    assert tree_preset("small", 3) == [[0], [1], [2], [3], [0, 0], [0, 1], [1, 0], [0, 0, 0]]
    with pytest.raises(ValueError, match="unknown tree preset"):
        tree_preset("huge", 3)


def test_parse_tree_forms(tmp_path):
    assert parse_tree("small", 3) == tree_preset("small", 3)
    assert parse_tree("[[0],[1],[0,0]]", 3) == [[0], [1], [0, 0]]
    with pytest.raises(ValueError, match="not valid JSON"):
        parse_tree("[[0],", 3)
    with pytest.raises(ValueError, match="unknown tree"):
        parse_tree("nope", 3)
    save_tree([[1], [0], [0, 0]], tmp_path)
    assert parse_tree(str(tmp_path), 3) == [[0], [1], [0, 0]]


def test_build_tree_follows_expected_contribution():
    acc = [[0.6, 0.2, 0.05], [0.5, 0.1, 0.0], [0.4, 0.0, 0.0]]
    # contributions: [0]=.6 [0,0]=.3 [1]=.2 [0,0,0]=.12 [1,0]=.1 [0,1]=.06 [2]=.05 ...
    assert build_tree(acc, 4) == [[0], [1], [0, 0], [0, 0, 0]]
    assert build_tree(acc, 6) == [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]]
    assert expected_accept_length([[0], [1], [0, 0]], acc) == pytest.approx(1 + 0.6 + 0.2 + 0.3)
    assert len(build_tree(acc, 1000)) < 1000  # zero-probability nodes are never added
    with pytest.raises(ValueError, match="budget"):
        build_tree(acc, 0)


def test_expected_chain_tau_is_the_top1_chain_tree():
    assert expected_chain_tau([]) == 1.0
    assert expected_chain_tau([0.5, 0.4]) == pytest.approx(1 + 0.5 + 0.5 * 0.4)
    acc = [0.7, 0.6, 0.5]
    assert expected_chain_tau(acc) == pytest.approx(expected_accept_length(tree_preset("chain", 3), [[a] for a in acc]))


@pytest.mark.parametrize("name", ["small", "medium", "large"])
@pytest.mark.parametrize("vocab", [1, 3, 11])
def test_presets_fit_the_vocabulary(name, vocab):
    paths = tree_preset(name, 3, vocab_size=vocab)
    assert max(max(p) for p in paths) < vocab and len(set(map(tuple, paths))) == len(paths)
    assert parse_tree(name, 3, vocab_size=vocab) == paths
    assert tree_preset(name, 3, vocab_size=1000) == tree_preset(name, 3)  # a large vocabulary changes nothing
    assert len(paths) == min(TREE_PRESETS[name], vocab + vocab ** 2 + vocab ** 3)


def test_the_acceptance_table_reads_back_from_tree_json(tmp_path):
    import json

    from multitoken.decoding import load_tree_acceptance
    from multitoken.errors import MultitokenError
    assert load_tree_acceptance(tmp_path) is None  # no tree.json
    save_tree([[0]], tmp_path)
    assert load_tree_acceptance(tmp_path) is None  # a tree without a table
    save_tree([[0], [0, 0]], tmp_path, acceptance=[[0.5, 0.1], [0.25, 0.05]])
    assert load_tree_acceptance(tmp_path).tolist() == [[0.5, 0.1], [0.25, 0.05]]
    record = json.loads((tmp_path / "tree.json").read_text())
    for bad in ([0.5, 0.1], [["x"]], [[0.5], [0.1, 0.2]]):
        (tmp_path / "tree.json").write_text(json.dumps({**record, "acceptance": bad}))
        with pytest.raises(MultitokenError, match="corrupt tree file"):
            load_tree_acceptance(tmp_path)
