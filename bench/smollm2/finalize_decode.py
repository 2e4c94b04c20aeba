"""Turn an interrupted `heads bench` run (its decode.json.partial, written after every prompt) into
decode.json + decode.md, timing the verify cost per width separately (the bench times it first,
but an interrupted run loses it).

Run: HF_HUB_OFFLINE=1 .venv/bin/python bench/smollm2/finalize_decode.py runs/smollm2-heads bench/smollm2/decode
"""
import json
import os
import sys
from pathlib import Path

import torch


def main(heads: str, prefix: str) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from multitoken.measure.decode import machine_description
    from multitoken.measure.decode_hf import markdown
    from multitoken.hf.wrapper import load_heads_model
    from multitoken.decoding.tree import verify_cost_by_width

    result = json.loads(Path(prefix + ".json.partial").read_text())
    model, _ = load_heads_model("smollm2", heads)
    verify = {}
    for threads in (1, 2):  # the bench ran with 1 thread; 2 threads stall in multi-row GEMMs when the CPU is shared
        torch.set_num_threads(threads)
        verify[threads] = verify_cost_by_width(model, [1, 2, 4, 8, 16], repeats=5)
    torch.set_num_threads(1)
    n = len(result["per_prompt"])
    result.update(verify_cost=verify[1], verify_cost_2_threads=verify[2], machine=machine_description(), base="smollm2", heads=heads,
                  interrupted=f"stopped after {n} of 20 prompts (time budget); rows pool the finished prompts")
    Path(prefix + ".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    title = f"decode: smollm2 + heads {heads} ({n} prompts, code and prose alternating)"
    text = markdown(result, title, result["machine"], verify[1])
    text += ("\nSame verify cost with 2 torch threads (the machine was shared, load average 6-7 on 2 cores):\n\n"
             "| W | seconds (median) | × W=1 |\n|---|---|---|\n"
             + "".join(f"| {v['width']} | {v['seconds']:.3f} | {v['relative']:.2f} |\n" for v in verify[2]))
    Path(prefix + ".md").write_text(text)
    print(Path(prefix + ".md").read_text())


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
