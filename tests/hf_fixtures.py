"""Tiny random Hugging Face models and a word-level tokenizer for the HF tests (no network)."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = ("def return if else for in while import class self x y z n i print true false none "
         "the a of to and is it that this with as be on at by from or an are was not").split()
# Repetitive texts: a pattern the heads can learn within a few steps.
TEXTS = [" ".join(WORDS[(3 * i + j) % 12] for j in range(60)) for i in range(24)]
ROLES = ("system", "user", "assistant")  # in the vocabulary after WORDS, for chat texts
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def make_tokenizer(chat: bool = False) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over WORDS (ids 0, 1 = <unk>, <eos>); ``chat`` adds a tiny chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>"] + WORDS + list(ROLES))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def make_model(seed: int = 0, vocab: int = 64, eos: int | None = 1, tie: bool = False) -> LlamaForCausalLM:
    """A 2-layer, 64-wide random Llama in eval mode; ``tie`` ties lm_head to the input embedding."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      eos_token_id=eos, bos_token_id=None, pad_token_id=None, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


ARCH_SIZES = dict(vocab_size=32, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
ARCHS = ("llama", "mistral", "qwen2")


def make_arch(arch: str, seed: int = 0, vocab: int = 32):
    """A 2-layer random Llama (linear rope scaling) / Mistral (no sliding window) / Qwen2 (biased
    q/k/v) in eval mode whose ``generate`` runs its full length on pure argmax (no EOS, pad 0)."""
    from transformers import LlamaConfig, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(seed)
    sizes = {**ARCH_SIZES, "vocab_size": vocab}
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**sizes, rope_scaling={"rope_type": "linear", "factor": 2.0}))
    elif arch == "mistral":
        model = MistralForCausalLM(MistralConfig(**sizes, sliding_window=None))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**sizes))
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()
