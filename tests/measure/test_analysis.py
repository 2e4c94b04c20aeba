import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from multitoken import MTPConfig, MTPModel, shift_targets
from multitoken.measure.analysis import (analyze, flops_per_token, format_analysis, memory_per_step, parameter_counts,
                                 saved_activation_bytes, speedup_bounds, supervision_signals)
from multitoken.cli.main import main
from multitoken.errors import MultitokenError
from conftest import HEAD_TYPES


def hand_config(**overrides) -> MTPConfig:
    """V=10, d=8, 1 layer, 2 query heads of 4 dims, 1 KV head (kv width 4), d_ff=16."""
    base = dict(vocab_size=10, d_model=8, n_layer=1, n_head=2, n_kv_head=1, d_ff=16, max_seq_len=16,
                n_future=3, head_type="residual")
    base.update(overrides)
    return MTPConfig(**base)


def test_parameter_counts_by_hand():
    # block: 2 norms 2*8 + q,o 2*8*8 + k,v 2*8*4 + SwiGLU 3*8*16 = 16 + 128 + 64 + 384 = 592
    # trunk: embedding 10*8 (lm_head tied) + 592 + final norm 8 = 680
    p = parameter_counts(hand_config())
    assert (p["trunk"], p["heads"], p["total"]) == (680, 2 * 2 * 8 * 8, 936)  # residual: 2 MLPs of 2*8*8
    assert p["overhead_pct"] == pytest.approx(100 * 256 / 680)
    # untied lm_head adds 10*8 to the trunk; linear heads are one own Linear(8, 10) each
    p = parameter_counts(hand_config(head_type="linear", tie_embeddings=False))
    assert (p["trunk"], p["heads"]) == (760, 2 * 80)
    # modulated: 2 step embeddings of 8 + one shared 2*8*8 transform
    assert parameter_counts(hand_config(head_type="modulated"))["heads"] == 2 * 8 + 128
    # transformer: per head one block (592) + norm (8); sequential: 3 norms + proj 2*8*8 + block
    assert parameter_counts(hand_config(head_type="transformer", n_layer=2))["heads"] == 2 * 600
    assert parameter_counts(hand_config(head_type="sequential"))["heads"] == 2 * (24 + 128 + 592)
    # residual heads with their own unembedding (share_embeddings=False)
    assert parameter_counts(hand_config(share_embeddings=False))["heads"] == 2 * (128 + 80)


@pytest.mark.parametrize("head_type", HEAD_TYPES)
@pytest.mark.parametrize("tie", [True, False])
def test_parameter_counts_match_the_model(head_type, tie):
    for n in (1, 3):
        cfg = hand_config(head_type=head_type, n_future=n, tie_embeddings=tie, n_layer=2)
        counts = MTPModel(cfg).num_parameters()
        p = parameter_counts(cfg)
        assert (p["trunk"], p["heads"], p["total"]) == (counts["trunk"], counts["heads"], counts["total"])


def test_flops_by_hand():
    f = flops_per_token(hand_config(), seq_len=16)
    # matmul weights per token: trunk q,o 128 + k,v 64 + SwiGLU 384 + lm_head 80 = 656;
    # each residual head: MLP 128 + lm_head 80 = 208
    assert f["trunk_matmul_weights"] == 656 and f["heads_matmul_weights"] == 2 * 208
    # attention forward per layer and token: 2 * d * (T + 1) = 2 * 8 * 17 = 272
    assert f["attention_flops_per_layer_fwd"] == 272
    assert f["train_flops_without_heads"] == 6 * 656 + 3 * 272
    assert f["train_flops_with_heads"] == 6 * (656 + 416) + 3 * 272
    assert f["forward_flops_with_heads"] == 2 * (656 + 416) + 272
    g = flops_per_token(hand_config(head_type="transformer", n_layer=2), seq_len=16)
    assert g["attention_layers"] == 4  # trunk layers + one per head
    assert g["train_flops_with_heads"] == 6 * (2 * 576 + 80 + 2 * (576 + 80)) + 3 * 272 * 4


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_matmul_flops_match_torch_flop_counter(head_type):
    cfg = hand_config(head_type=head_type, vocab_size=40, d_model=16, n_head=4, n_kv_head=2, d_ff=24, n_layer=2)
    model = MTPModel(cfg).train()
    B, T = 2, 12
    with FlopCounterMode(display=False) as counter:
        model(torch.randint(0, 40, (B, T))).sum().backward()
    f = flops_per_token(cfg, T)
    matmul = sum(v for k, v in counter.get_flop_counts()["Global"].items() if "attention" not in str(k))
    assert matmul == 6 * (f["trunk_matmul_weights"] + f["heads_matmul_weights"]) * B * T


def _saved_bytes(model, tokens) -> int:
    """Unique storages autograd saves in model(tokens), parameters and buffers excluded."""
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(tokens)
    own = {p.untyped_storage().data_ptr() for p in list(model.parameters()) + list(model.buffers())}
    del out
    return sum(v for k, v in seen.items() if k not in own)


@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_saved_activation_bytes_are_exact(head_type):
    cfg = hand_config(head_type=head_type, vocab_size=40, d_model=24, n_head=6, n_kv_head=3, d_ff=40, n_layer=2)
    model = MTPModel(cfg).train()
    tokens = torch.randint(0, 40, (3, 10))
    analytic = saved_activation_bytes(cfg, tokens.numel())
    assert analytic["trunk"] + analytic["heads"] == _saved_bytes(model, tokens)


def test_memory_per_step_terms():
    cfg = hand_config(vocab_size=1000)
    m = memory_per_step(cfg, batch_size=2, seq_len=16, chunk_size=4)
    assert m["logits_one_head"] == 2 * 16 * 1000 * 4
    assert m["naive_logits"] == 2 * 3 * m["logits_one_head"]
    assert m["mtp_logits"] == 3 * 2 * 4 * 1000 * 4  # one head, one chunk; independent of n_future
    assert m["mtp_logits"] == memory_per_step(cfg.replace(n_future=8), 2, 16, 4)["mtp_logits"]
    assert m["gradients"] == 4 * parameter_counts(cfg)["total"]
    assert m["naive_step"] > m["mtp_step"]


def test_supervision_signals_count_lost_targets():
    s = supervision_signals(seq_len=5, n_future=3)
    assert s["per_head"] == [4, 3, 2] and s["next_token"] == 4 and s["mtp"] == 9
    assert s["tutorial_claim"] == 12 and s["lost_at_sequence_end"] == 3
    assert s["density_gain"] == pytest.approx(9 / 4)
    assert supervision_signals(2, 4)["per_head"] == [1, 0, 0, 0]
    # the same counts as the targets the loss actually sees
    tokens = torch.randint(0, 9, (3, 7))
    valid = sum(int((shift_targets(tokens, i) != -100).sum()) for i in range(4))
    assert valid == supervision_signals(7, 4, batch_size=3)["mtp"]
    with pytest.raises(ValueError):
        supervision_signals(0, 2)


def test_speedup_bounds():
    rows = [{"mode": "ar", "tau": 1.0, "tokens_per_s": 10.0, "speedup": 1.0, "forward_passes": 100,
             "new_tokens": 100, "wall_s": 10.0},
            {"mode": "spec", "tau": 2.5, "tokens_per_s": 16.0, "speedup": 1.6, "forward_passes": 40,
             "new_tokens": 100, "wall_s": 6.25, "num_draft": 3}]
    (b,) = speedup_bounds(rows)  # measured seconds per forward: the bound is the realised speed-up
    assert b["mode"] == "spec" and b["t1_s"] == pytest.approx(0.1) and b["verify_s"] == pytest.approx(0.15625)
    assert b["speedup_bound"] == pytest.approx(1.6) and b["measured_speedup"] == 1.6
    (b,) = speedup_bounds({"rows": rows, "verify_cost": [{"width": 1, "seconds": 0.1}, {"width": 4, "seconds": 0.2}]})
    assert b["speedup_bound"] == pytest.approx(2.5 * 0.1 / 0.2) and b["verify_source"] == "verify_cost[4]"


def test_analyze_and_text(tmp_path):
    bench = tmp_path / "decode.json"
    bench.write_text(json.dumps([{"mode": "ar", "tau": 1.0, "wall_s": 1.0, "forward_passes": 10},
                                 {"mode": "spec", "tau": 2.0, "wall_s": 0.75, "forward_passes": 5, "speedup": 1.33}]))
    result = analyze(hand_config(), seq_len=8, batch_size=2, bench=bench)
    assert result["supervision"]["mtp"] == 7 + 6 + 5  # per sequence
    assert result["speedup_bounds"][0]["speedup_bound"] == pytest.approx(2.0 * 0.1 / 0.15)
    text = format_analysis(result)
    assert "overhead 37.6%" in text and "spec: tau 2.00" in text
    with pytest.raises(ValueError, match="max_seq_len"):
        analyze(hand_config(), seq_len=99)


def test_cli_analyze(tmp_path, capsys):
    cfg = hand_config()
    cfg.save(tmp_path / "cfg.json")
    (tmp_path / "model").mkdir()
    cfg.save(tmp_path / "model" / "config.json")
    assert main(["analyze", "--config", str(tmp_path / "cfg.json"), "--seq-len", "16"]) == 0
    assert "trunk 680" in capsys.readouterr().out
    assert main(["analyze", "--model", str(tmp_path / "model"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["parameters"]["heads"] == 256 and data["flops_per_token"]["seq_len"] == 16
    for argv in (["analyze"], ["analyze", "--config", str(tmp_path / "nope.json")],
                 ["analyze", "--model", str(tmp_path / "missing")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:")


@pytest.mark.parametrize("kw", [{"seq_len": 0}, {"seq_len": -1}, {"batch_size": 0}, {"chunk_size": 0},
                                {"seq_len": 2.5}, {"seq_len": True}])
def test_analyze_rejects_nonsense(kw):
    with pytest.raises(MultitokenError, match=f"{next(iter(kw))}="):
        analyze(hand_config(), **kw)
