import torch

from multitoken import shift_targets
from multitoken.model.targets import shift_tokens


def test_head_i_targets_token_t_plus_i_plus_1():
    tokens = torch.arange(10, 16)[None]  # 10..15
    assert shift_targets(tokens, 0).tolist() == [[11, 12, 13, 14, 15, -100]]
    assert shift_targets(tokens, 2).tolist() == [[13, 14, 15, -100, -100, -100]]


def test_targets_past_end_are_ignored_when_n_future_exceeds_length():
    tokens = torch.tensor([[1, 2, 3]])
    assert shift_targets(tokens, 5).tolist() == [[-100, -100, -100]]
    assert shift_targets(tokens, 5, ignore_index=-1).tolist() == [[-1, -1, -1]]


def test_targets_never_cross_document_boundaries():
    tokens = torch.tensor([[1, 2, 3, 4, 5, 6]])
    docs = torch.tensor([[0, 0, 0, 1, 1, 2]])
    assert shift_targets(tokens, 0, doc_ids=docs).tolist() == [[2, 3, -100, 5, -100, -100]]
    assert shift_targets(tokens, 1, doc_ids=docs).tolist() == [[3, -100, -100, -100, -100, -100]]


def test_shift_tokens_fills_past_end():
    assert shift_tokens(torch.tensor([[1, 2, 3]]), 1, 0).tolist() == [[2, 3, 0]]
