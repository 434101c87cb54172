"""Systems figures a practitioner watches: step time, throughput, model FLOPs/s and MFU, peak memory.

Model FLOPs follow the ledger's conventions (a multiply-add is 2 FLOPs; matrix products only):
the blocks' executed forward FLOPs as the blocks report them (``DepthAux``), plus a decoder's LM
head, times 3 for forward and backward (recomputation under activation checkpointing is not
counted: MFU measures useful work). MFU divides by the device's peak: ``train.peak_tflops`` when
set, else the dense bf16 tensor-core peak of known GPUs, else none (CPUs: MFU is not reported).
"""

from __future__ import annotations

from pathlib import Path

import torch

from dynamoe.depth import depth_summary

# Dense bf16 tensor-core peaks, TFLOP/s, by a substring of the device name.
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def device_peak_tflops(configured: float | None) -> float | None:
    if configured is not None:
        return configured
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, peak in GPU_PEAK_TFLOPS.items():
            if key in name:
                return peak
    return None


def peak_memory_mib() -> float | None:
    """CUDA's max allocated memory on GPU, else the process's peak resident memory (VmHWM)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def forward_flops(model, out, block_flops: float | None = None) -> float:
    """Forward FLOPs of one micro-batch: the blocks' executed FLOPs (``block_flops`` when the
    caller has summed the depth records already) plus a decoder's LM head."""
    flops = depth_summary(out.depth).get("flops", 0.0) if block_flops is None else block_flops
    head = getattr(model, "head", None)
    if isinstance(head, torch.nn.Linear) and out.logits.dim() == 3:  # the LM head on every token
        flops += 2.0 * out.logits.shape[0] * out.logits.shape[1] * head.in_features * head.out_features
    return flops


def window_fields(
    steps: int, elapsed: float, tokens: int, train_flops: float, world: int, peak_tflops: float | None
) -> dict:
    """The figures of one logging window (``steps`` steps in ``elapsed`` seconds, all ranks)."""
    elapsed = max(elapsed, 1e-9)
    flops_per_s = train_flops / elapsed
    fields = {
        "step_time_s": elapsed / max(steps, 1),
        "tokens_per_s": tokens / elapsed,
        "tokens_per_s_per_process": tokens / elapsed / world,
        "model_tflops_per_s": flops_per_s / 1e12,
        "peak_memory_mib": peak_memory_mib(),
    }
    fields["mfu"] = flops_per_s / (peak_tflops * 1e12 * world) if peak_tflops else None
    return fields
