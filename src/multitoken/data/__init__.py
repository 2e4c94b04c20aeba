"""Corpus, tokenizers, and the text and prompt sets (training texts, benchmark prompts)."""
from multitoken.data.corpus import STDLIB, DataError, iter_documents, split_of
from multitoken.data.prompts import (
    CODE_INSTRUCTION, PROSE_PROMPTS, code_snippets, interleave, parse_prompts, prose_documents, read_prompts,
    training_texts, validation_prompts,
)
from multitoken.data.packing import PackedDataset
from multitoken.data.requests import (
    GROUPS, Request, bench_prompts, clean_self_instruct, distill_requests, load_bench_requests, self_instruct_prefix,
)
from multitoken.data.store import build_token_store, token_dtype
from multitoken.data.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer, make_tokenizer

__all__ = [
    "STDLIB", "DataError", "iter_documents", "split_of", "token_dtype", "build_token_store", "PackedDataset",
    "Tokenizer", "ByteTokenizer", "load_tokenizer", "make_tokenizer", "CODE_INSTRUCTION", "PROSE_PROMPTS",
    "code_snippets", "parse_prompts", "read_prompts", "validation_prompts", "interleave", "training_texts",
    "prose_documents", "GROUPS", "Request", "bench_prompts", "clean_self_instruct", "distill_requests",
    "load_bench_requests", "self_instruct_prefix",
]
