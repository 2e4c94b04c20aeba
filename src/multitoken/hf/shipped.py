"""Ready-made MTP heads that ship inside the package, by name.

``src/multitoken/hf/heads/<name>/`` holds ``heads.safetensors`` (16-bit weights; the base still
verifies every token, so output is unchanged), ``heads_config.json`` (with the base's identity,
which loading checks) and the tuned ``tree.json``, made by ``multitoken heads train`` with the
recipe script and training log beside them. ``--heads smollm2`` (or ``--base smollm2`` with no
``--heads``) uses ``heads/smollm2``.
"""
from __future__ import annotations

import os
from pathlib import Path

from multitoken.errors import MultitokenError

SHIPPED_ROOT = Path(__file__).resolve().parent / "heads"
# base name -> shipped heads folder name (the base each set was trained for)
SHIPPED_FOR_BASE = {"smollm2": "smollm2"}


def shipped_heads() -> list[str]:
    """Names of the shipped head sets that are present (a set is present when its weights are)."""
    if not SHIPPED_ROOT.is_dir():
        return []
    return sorted(p.name for p in SHIPPED_ROOT.iterdir() if (p / "heads.safetensors").is_file())


def resolve_heads(heads: str | os.PathLike | None, base: str | None = None) -> Path:
    """The heads folder for ``heads``: a shipped name (``"smollm2"``), a folder path, or None for
    the set shipped for ``base``. Raises MultitokenError when nothing fits."""
    if heads is None:
        name = SHIPPED_FOR_BASE.get(str(base)) if base is not None else None
        if name is None:
            raise MultitokenError(f"no ready-made heads for base {base!r}: pass --heads DIR (heads trained with "
                                  f"`multitoken heads train`)" + (f"; shipped: {', '.join(shipped_heads())}"
                                                                  if shipped_heads() else ""))
        heads = name
    text = os.fspath(heads)
    if text in SHIPPED_FOR_BASE.values() and not Path(text).exists():
        folder = SHIPPED_ROOT / text
        if not (folder / "heads.safetensors").is_file():
            raise MultitokenError(f"the ready-made {text} heads are missing from this installation ({folder}); "
                                  "reinstall multitoken or remake them with src/multitoken/hf/heads/smollm2/recipe.sh")
        return folder
    return Path(text)


def export_heads(src: str | os.PathLike, dst: str | os.PathLike, dtype=None) -> Path:
    """Copy a trained heads folder (``multitoken heads train --out``) to ``dst`` for shipping:
    ``heads.safetensors`` with floating tensors stored as ``dtype`` (default float16: half the
    bytes; they load back into the base's dtype, and the base still verifies every token, so
    output is unchanged), ``heads_config.json`` (recording the stored dtype) and ``tree.json``."""
    import torch
    from safetensors.torch import load_file, save

    from multitoken.io import atomic_write, read_json, write_json

    src, dst = Path(src), Path(dst)
    dtype = torch.float16 if dtype is None else dtype
    config = read_json(src / "heads_config.json", "heads config")
    state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous()
             for k, v in load_file(str(src / "heads.safetensors")).items()}
    atomic_write(dst / "heads.safetensors", save(state))
    write_json(dst / "heads_config.json", {**config, "stored_dtype": str(dtype).removeprefix("torch.")})
    if (src / "tree.json").is_file():
        atomic_write(dst / "tree.json", (src / "tree.json").read_bytes())
    return dst
