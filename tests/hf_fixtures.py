"""Tiny random Hugging Face models and a word-level tokenizer for the HF tests (no network)."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = ("def return if else for in while import class self x y z n i print true false none "
         "the a of to and is it that this with as be on at by from or an are was not").split()
# Repetitive texts: a pattern the heads can learn within a few steps.
TEXTS = [" ".join(WORDS[(3 * i + j) % 12] for j in range(60)) for i in range(24)]


def make_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def make_model(seed: int = 0, vocab: int = 64, eos: int | None = 1) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      eos_token_id=eos, bos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(cfg).eval()
