"""Turn an interrupted `heads bench` run (its decode.json.partial, written after every prompt) into
decode.json + decode.md, timing the verify cost per width separately (the bench times it first,
but an interrupted run loses it).

Run: HF_HUB_OFFLINE=1 .venv/bin/python bench/smollm2/finalize_decode.py runs/smollm2-heads bench/smollm2/decode
"""
import os
import sys
from pathlib import Path

import torch


def main(heads: str, prefix: str) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from multitoken.hf import load_heads_model
    from multitoken.io import atomic_write, read_json, write_json
    from multitoken.measure.decode_run import decode_path
    from multitoken.measure.decode_tables import decode_markdown
    from multitoken.measure.machine import machine_info
    from multitoken.measure.verify_cost import verify_cost_by_width

    result = read_json(prefix + ".json.partial", "partial decode result")
    model, _ = load_heads_model("smollm2", heads)
    verify = {}
    for threads in (1, 2):  # the bench ran with 1 thread; 2 threads stall in multi-row GEMMs when the CPU is shared
        torch.set_num_threads(threads)
        verify[threads] = verify_cost_by_width(model, [1, 2, 4, 8, 16], repeats=5)
    torch.set_num_threads(1)
    n = len(result["per_prompt"])
    result.update(verify_cost=verify[1], verify_cost_2_threads=verify[2], machine=machine_info(), base="smollm2",
                  heads=heads, chat=True, decode_path=decode_path(model), eos_id=model.base.config.eos_token_id,
                  interrupted=f"stopped after {n} of 20 prompts (time budget); rows pool the finished prompts")
    write_json(prefix + ".json", result)
    title = f"decode: smollm2 + heads {heads} ({n} prompts, code and prose alternating)"
    text = decode_markdown(result, title)
    text += ("\nSame verify cost with 2 torch threads (the machine was shared, load average 6-7 on 2 cores):\n\n"
             "| W | seconds (median) | × W=1 |\n|---|---|---|\n"
             + "".join(f"| {v['width']} | {v['seconds']:.3f} | {v['relative']:.2f} |\n" for v in verify[2]))
    atomic_write(prefix + ".md", text)
    print(Path(prefix + ".md").read_text())


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
