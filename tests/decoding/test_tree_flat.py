"""Tree representation: validating and flattening static trees."""
import pytest
import torch

from multitoken.decoding import flatten_tree, validate_tree

HAND_TREE = [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]]


def test_flatten_hand_built_tree():
    t = flatten_tree(HAND_TREE)
    # node 0 = root (pending token); then depth 1: [0] [1]; depth 2: [0,0] [0,1] [1,0]; depth 3: [0,0,0]
    assert [list(p) for p in t.paths] == HAND_TREE
    assert t.width == 7 and t.max_depth == 3 and t.top_k == 2
    assert t.parents.tolist() == [-1, 0, 0, 1, 1, 2, 3]
    assert t.depths.tolist() == [0, 1, 1, 2, 2, 2, 3]
    assert t.heads.tolist() == [0, 1, 1, 2, 2, 2, 3]
    assert t.ranks.tolist() == [-1, 0, 1, 0, 1, 0, 0]
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0, 0],
        [1, 1, 0, 1, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0],
        [1, 0, 1, 0, 0, 1, 0],
        [1, 1, 0, 1, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(t.mask, expected)
    # unordered input gives the same flattening
    assert torch.equal(flatten_tree(list(reversed(HAND_TREE))).mask, expected)
    cut = t.truncated(1)
    assert [list(p) for p in cut.paths] == [[0], [1]] and cut.width == 3


@pytest.mark.parametrize("paths,num_heads,needle", [
    ([[0], [0, 0], [1, 1]], None, r"\[1, 1\] has no parent: add \[1\]"),
    ([[0], [0, 0], [0, 0, 0]], 2, "depth 3, but the model has only 2 draft heads"),
    ([[0], [0]], None, "appears twice"),
    ([[0], []], None, "empty tree path"),
    ([[0], [-1]], None, "non-negative integers"),
    ([[0], [0.5]], None, "non-negative integers"),
    ([], None, "at least one path"),
    ("[[0]]", None, "list of paths"),
    ([0, 1], None, "not a list of top-k ranks"),
])
def test_validation_errors_are_clear(paths, num_heads, needle):
    with pytest.raises(ValueError, match=needle):
        validate_tree(paths, num_heads)
