"""What every benchmark records beside its rows: the machine it ran on, and the JSON file."""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path


def hardware_info() -> dict:
    """The CPU, its core count and the versions that matter to the figures."""
    model = ""
    try:  # platform.processor() is often empty on Linux; /proc/cpuinfo names the CPU
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {}
    for package in ("torch", "deepspeed"):  # from metadata: no need to import either here
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_model": model,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        **versions,
    }


def write_json(result: dict, path: str | None) -> None:
    if not path:
        return
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


def moe_layer_label(row: dict, prefix: str = "MoE layer ") -> str:
    """``MoE layer 1 (block 3)`` for a load-balance row: the block (counted from 0, as the training
    metrics name it) says where in the network the layer sits."""
    block = row.get("block")
    return f"{prefix}{row['layer']}" + ("" if block is None else f" (block {block})")
