"""The one description of the machine a benchmark ran on: a dict stored with every result,
and the one line that tables print from it."""
from __future__ import annotations

import datetime as _dt
import os
import platform
from pathlib import Path

import torch

from multitoken.io import proc_field


def machine_info(device: str = "cpu") -> dict:
    """CPU model, core count, memory, torch version and threads (and the GPU, on CUDA)."""
    info = {"cpu": proc_field("/proc/cpuinfo", "model name") or platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "os": f"{platform.system()} {platform.release()}"}
    if hasattr(os, "getloadavg"):
        info["load_avg"] = [round(x, 2) for x in os.getloadavg()]  # 1, 5, 15 min: other work on the machine
    mem = proc_field("/proc/meminfo", "MemTotal")
    if mem:
        info["memory_gb"] = round(int(mem.split()[0]) / 1024 ** 2, 1)  # reported in kB
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def describe_machine(info: dict | str | None = None) -> str:
    """One line, e.g. 'AMD EPYC, 2 cores, 23.4 GB RAM, torch 2.13.0+cpu, 2 torch threads'.

    ``info`` is a :func:`machine_info` dict (None: this machine now); a string (how older
    results recorded the machine) is returned as it is.
    """
    if info is None:
        info = machine_info()
    if isinstance(info, str):
        return info
    if info.get("description"):
        return str(info["description"])
    parts = [info.get("gpu") or "", str(info.get("cpu", "?")), f"{info.get('cores', '?')} cores"]
    if "memory_gb" in info:
        parts.append(f"{info['memory_gb']} GB RAM")
    threads = info.get("threads", "?")
    parts += [f"torch {info.get('torch', '?')}", f"{threads} torch thread{'' if threads == 1 else 's'}"]
    if info.get("load_avg"):
        parts.append("load average " + "/".join(str(x) for x in info["load_avg"]) + " (1/5/15 min)")
    return ", ".join(p for p in parts if p)


def timestamp() -> str:
    """Now, local time with its UTC offset, to the second: every result's ``date``."""
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")
