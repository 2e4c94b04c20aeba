"""BlockLinear: the oneDNN reordered-weight path for decode passes, and F.linear everywhere else."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from multitoken.hf.kernels import (MAX_ROWS, ONEDNN_ALWAYS, ONEDNN_NEVER, BlockLinear, FusedBlockLinears, available,
                                   block_kernels, install_block_linears)

pytestmark = pytest.mark.skipif(not available(), reason="oneDNN (mkldnn) is not in this torch build")


def converted(bias: bool, seed: int = 0) -> BlockLinear:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(48, 80, bias=bias))
    assert install_block_linears(net) == 1
    return net[0]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 48), (3, 48), (1, 5, 48), (2, 8, 48), (16, 48)])
def test_block_path_matches_f_linear(bias, shape):
    layer = converted(bias)
    x = torch.randn(shape)
    ref = F.linear(x.double(), layer.weight.double(), None if layer.bias is None else layer.bias.double())
    with torch.no_grad():
        plain = layer(x)
        with block_kernels():
            fast = layer(x)
    assert torch.equal(plain, F.linear(x, layer.weight, layer.bias))  # outside the context: F.linear, bitwise
    assert fast.shape == plain.shape
    torch.testing.assert_close(fast.double(), ref, atol=1e-5, rtol=1e-5)
    # float32 accuracy, not a bitwise promise: as close to float64 as F.linear is, within a few ulps
    assert (fast.double() - ref).abs().max() <= 8 * (plain.double() - ref).abs().max() + 1e-6


def test_prefill_grad_and_other_dtypes_take_f_linear():
    layer = converted(True)
    big = torch.randn(MAX_ROWS + 1, 48)
    with torch.no_grad(), block_kernels():
        assert torch.equal(layer(big), F.linear(big, layer.weight, layer.bias))
    x = torch.randn(4, 48, requires_grad=True)
    with block_kernels():  # gradients enabled: training must see F.linear and get gradients
        y = layer(x)
    assert torch.equal(y, F.linear(x, layer.weight, layer.bias))
    y.sum().backward()
    assert x.grad is not None and layer.weight.grad is not None
    half = converted(False).to(torch.bfloat16)
    xb = torch.randn(4, 48, dtype=torch.bfloat16)
    with torch.no_grad(), block_kernels():
        assert torch.equal(half(xb), F.linear(xb, half.weight))


@pytest.mark.parametrize("min_rows", [ONEDNN_ALWAYS, 3, ONEDNN_NEVER])
def test_blocks_below_min_rows_take_f_linear(min_rows, monkeypatch):
    layer = converted(True)
    used = []
    real = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: used.append(a[0].shape) or real(*a),
                        raising=False)
    with torch.no_grad(), block_kernels(min_rows=min_rows):
        for rows in (1, 2, 3, 4, MAX_ROWS):
            x = torch.randn(rows, 48)
            y = layer(x)
            if rows < min_rows:
                assert torch.equal(y, F.linear(x, layer.weight, layer.bias))
    assert [shape[0] for shape in used] == [r for r in (1, 2, 3, 4, MAX_ROWS) if r >= min_rows]


def test_weight_changed_in_place_is_repacked():
    layer = converted(False)
    x = torch.randn(4, 48)
    with torch.no_grad(), block_kernels():
        before = layer(x)
        layer.weight.mul_(2.0)
        after = layer(x)
    torch.testing.assert_close(after, 2 * before, atol=1e-5, rtol=1e-5)


def test_install_is_idempotent_and_keeps_state_dict_and_hf_generate():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None
    prompt = torch.tensor([[1, 2, 3, 4]])
    keys = list(model.state_dict())
    ref = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    linears = sum(type(m) is nn.Linear for m in model.modules())
    assert install_block_linears(model) == linears == install_block_linears(model)
    assert list(model.state_dict()) == keys
    assert all(isinstance(m, BlockLinear) for m in model.modules() if isinstance(m, nn.Linear))
    assert torch.equal(model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0), ref)


def test_copies_and_pickles_work_after_decoding():
    import copy
    import io
    layer = converted(True)
    x = torch.randn(3, 48)
    with torch.no_grad(), block_kernels():
        before = layer(x)  # builds the opaque reordered weight
        twin = copy.deepcopy(layer)
        buffer = io.BytesIO()
        torch.save(layer, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        assert torch.equal(twin(x), before) and torch.equal(loaded(x), before)


def fused_layers(biases: tuple[bool, ...], seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    net = nn.Sequential(*(nn.Linear(48, width, bias=b) for width, b in zip((80, 16, 16), biases)))
    install_block_linears(net)
    return list(net)


@pytest.mark.parametrize("biases", [(False, False, False), (True, True, True)])
@pytest.mark.parametrize("shape", [(1, 48), (4, 48), (2, 8, 48)])
def test_fused_linears_match_each_layer(biases, shape, monkeypatch):
    layers = fused_layers(biases)
    fused = FusedBlockLinears(layers)
    assert fused.fusable
    calls = []
    real = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda *a: calls.append(a[1]) or real(*a),
                        raising=False)
    x = torch.randn(shape)
    with torch.no_grad(), block_kernels():
        outs = fused(x)
        singles = [layer(x) for layer in layers]
    assert len(calls) == 1 + len(layers)  # one product for the fused call, then one per layer
    for out, single, layer in zip(outs, singles, layers):
        assert out.shape == single.shape == (*shape[:-1], layer.out_features)
        torch.testing.assert_close(out, single, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # outside block_kernels: each layer itself, bitwise
        assert all(torch.equal(o, layer(x)) for o, layer in zip(fused(x), layers))


def test_fused_linears_fall_back_for_mixed_biases_and_other_modules():
    mixed = FusedBlockLinears(fused_layers((True, False, True)))
    lora_like = fused_layers((False, False, False))
    lora_like[1] = nn.Sequential(lora_like[1])  # e.g. an adapter around one projection
    x = torch.randn(4, 48)
    for fused in (mixed, FusedBlockLinears(lora_like)):
        assert not fused.fusable
        with torch.no_grad(), block_kernels():
            assert all(torch.equal(o, layer(x)) for o, layer in zip(fused(x), fused.layers))


def test_fused_linears_repack_after_in_place_change_and_copy():
    import copy
    layers = fused_layers((True, True, True))
    fused = FusedBlockLinears(layers)
    x = torch.randn(4, 48)
    with torch.no_grad(), block_kernels():
        before = fused(x)
        layers[2].weight.mul_(2.0)
        layers[2].bias.mul_(2.0)
        after = fused(x)
        twin = copy.deepcopy(fused)
        assert all(torch.equal(a, b) for a, b in zip(twin(x), after))
        layers[0].weight.data = torch.zeros_like(layers[0].weight)  # storage swapped without an in-place op
        assert torch.equal(fused(x)[0], layers[0].bias.expand(4, -1))
    torch.testing.assert_close(after[2], 2 * before[2], atol=1e-5, rtol=1e-5)
    assert torch.equal(after[0], before[0])
