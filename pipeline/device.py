"""The one device and precision resolver.

``--device auto`` is CUDA when torch sees a GPU, else the CPU. ``--precision auto``
means one thing everywhere: reduced precision on a GPU (bf16 where the GPU supports it,
fp16 on older GPUs), fp32 on a CPU (CPU autocast is slower than fp32 for these models).
"""

from __future__ import annotations

from typing import Any

from .errors import UserError

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")


def resolve_device(device: Any = "auto") -> Any:
    """``auto``/``cpu``/``cuda``/``cuda:N`` (or a torch.device) -> torch.device; refuses a GPU that is not there."""
    import torch

    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.split(":")[0] not in ("cpu", "cuda"):
        raise UserError(lambda flag: f"unknown {flag('device')} {name!r}; use auto, cpu or cuda")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(
            lambda flag: (
                f"{flag('device')} {name} asked for, but torch sees no GPU here; use {flag('device')} cpu or auto"
            )
        )
    return torch.device(name)


def autocast_dtype(precision: str, device: Any, *, allow_fp16: bool = True) -> Any:
    """The autocast dtype for ``precision`` on ``device`` (a torch.device or its type), None for fp32.

    ``allow_fp16=False`` (training, which runs no loss scaler): ``auto`` on a GPU without
    bf16 stays fp32 and an explicit fp16 is refused.
    """
    import torch

    device_type = getattr(device, "type", str(device))
    if precision not in PRECISIONS:
        raise UserError(lambda flag: f"unknown {flag('precision')} {precision!r}; choose auto, fp32, fp16 or bf16")
    if precision == "fp32" or (precision == "auto" and device_type != "cuda"):
        return None
    if precision == "fp16" and not allow_fp16:
        raise UserError(
            lambda flag: (
                f"{flag('precision')} fp16 is not offered for training (no loss scaling); use bf16, fp32 or auto"
            )
        )
    if precision == "bf16":
        return torch.bfloat16
    if device_type != "cuda":
        return torch.bfloat16  # fp16 asked on a CPU: CPU autocast runs bf16
    if precision == "auto":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16 if allow_fp16 else None
    return torch.float16


def pad_lone_image(x: Any) -> Any:
    """(N, 3, H, W) channels-last input; a batch of one image, doubled. On CPU (oneDNN) a batch of one runs another kernel whose
    float32 rounding differs from any larger batch's (measured: batches of 2, 3, 8 agree
    bitwise, 1 does not), so a shard of one image would get features 1 float16 ulp off those
    the same image gets in a bigger shard. Doubled, every image sees a batch of >= 2."""
    import torch

    return torch.cat([x, x]).contiguous(memory_format=torch.channels_last) if len(x) == 1 else x
