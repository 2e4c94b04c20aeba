"""``multitoken heads train``: load the base, build (or reuse) its hidden cache, train the heads."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from multitoken.data import training_texts
from multitoken.hf.doc_packing import DocumentStates
from multitoken.io import write_json
from multitoken.training.heads import train_heads
from multitoken.training.heads_config import HeadsTrainConfig, HeadsTrainError


def _texts(model, tokenizer, data: Sequence[str] | None, generate_distill: int, progress: bool,
           keep_states: bool, seq_len: int) -> Iterable[str | DocumentStates]:
    """The cache's texts: the base's own answers (``generate_distill`` tokens) first, then ``data``.
    keep_states: the answers come with the states generation computed (documents layout, final-norm
    cache), so the cache need not run the base over them again."""
    texts: Iterable[str] = training_texts(data)
    if not generate_distill:
        return texts
    from multitoken.hf.distill import distill_prompts, generate_distill_documents, generate_distill_texts

    texts = list(texts)
    # One request per 96 answer tokens: SmolLM2's answers average ~118 (they stop at EOS or 128
    # tokens), so ~20% are spare; generation stops at generate_distill, dropping a random subset.
    prompts = distill_prompts(tokenizer, texts[::7], max(8, generate_distill // 96), model=model, progress=progress)
    if keep_states:
        return generate_distill_documents(model, tokenizer, prompts, generate_distill, max_len=seq_len,
                                          progress=progress) + texts
    return generate_distill_texts(model, tokenizer, prompts, generate_distill, progress=progress) + texts


def run_heads_train(base: str, data: Sequence[str] | None, out_dir: str | os.PathLike, cfg: HeadsTrainConfig,
                    cache_dir: str | os.PathLike | None = None, max_tokens: int = 65536, seq_len: int = 256,
                    generate_distill: int = 0, dtype: str = "float32", threads: int | None = None,
                    progress: bool = True, train_base_layers: int = 0, lora_rank: int = 0,
                    cache_layout: str = "documents") -> dict[str, Any]:
    """``multitoken heads train``: hidden cache (built or reused, ``cache_layout`` as in
    :func:`~multitoken.hf.build_hidden_cache`), then :func:`train_heads`.
    With ``train_base_layers`` the cache holds the input of the first trained layer."""
    from multitoken.hf import (
        HiddenCache, MTPHeadsForCausalLM, build_hidden_cache, cache_layer, load_base, model_identity,
    )

    if threads:
        torch.set_num_threads(threads)
    if max_tokens < seq_len:
        raise HeadsTrainError(f"--max-tokens {max_tokens} is less than one sequence of {seq_len} tokens")
    out = Path(out_dir)
    t0 = time.perf_counter()
    model, tokenizer = load_base(base, dtype)
    model.eval()
    identity = model_identity(model, tokenizer)
    load_s = time.perf_counter() - t0
    cache_path = Path(cache_dir) if cache_dir else out / "hidden_cache"
    t1 = time.perf_counter()
    reused = (cache_path / "meta.json").is_file()
    if reused:
        cache = HiddenCache(cache_path)  # reuse, whatever texts built it, once it is this model's
        cache.check_model(model, tokenizer)
    else:
        layer = cache_layer(model, train_base_layers)
        texts = _texts(model, tokenizer, data, generate_distill, progress,
                       keep_states=cache_layout == "documents" and layer is None, seq_len=seq_len)
        cache = build_hidden_cache(model, tokenizer, texts, cache_path, seq_len=seq_len, max_tokens=max_tokens,
                                   progress=progress, layer=layer, layout=cache_layout)
    cache_s = time.perf_counter() - t1
    heads = MTPHeadsForCausalLM(model, cfg.n_future, cfg.head_type, d_ff=cfg.d_ff, identity=identity,
                                train_base_layers=train_base_layers, lora_rank=lora_rank)
    summary = train_heads(heads, cache, cfg, out, progress=progress,
                          extra_meta={"cache": str(cache_path), "cache_tokens": int(cache.meta["count"]),
                                      "cache_build_s": None if reused else cache_s, "base": base})
    summary.update(load_s=load_s, cache_s=cache_s, cache_reused=reused, cache_tokens=int(cache.meta["count"]),
                   out=str(out))
    write_json(out / "train_summary.json", summary)
    return summary
