"""What a run records about itself: ``config.json`` (settings, case lists, where and with what it ran, each
resume) and the GPU's utilisation and power beside every log line.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import platform
from pathlib import Path

import numpy as np
import torch

import uamt_fast
from uamt_fast import files


def environment(device: torch.device, argv: list) -> dict:
    """Versions, device and command line, for config.json."""
    env = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
           "uamt_fast": uamt_fast.__version__, "device": str(device), "argv": argv,
           "started": datetime.datetime.now().isoformat(timespec="seconds")}
    with contextlib.suppress(ImportError):
        import triton

        env["triton"] = triton.__version__
    if device.type == "cuda":
        env |= {"gpu": torch.cuda.get_device_name(device), "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version()}
    return env


def write_config(out: Path, config: dict, env: dict, split: dict, resumed: bool) -> None:
    """config.json: the settings, the case lists and the environment; a --resume adds its environment to
    ``resumed`` and records the settings it runs with (the data may have moved), keeping the first start's."""
    record = {"config": config, "data_split": split, "environment": env}
    if resumed:
        with contextlib.suppress(ValueError):  # (files.read_json: any unreadable config.json is a ValueError)
            old = files.read_json(out / "config.json", "the run's config")
            earlier = old.get("resumed") if isinstance(old.get("resumed"), list) else []
            record = old | {"config": config, "data_split": split, "resumed": [*earlier, env]}
    files.atomic_write_text(out / "config.json", json.dumps(record, indent=1))


def gpu_monitor(device: torch.device):
    """A function returning {gpu_util, gpu_power_w} via nvidia-ml-py, or {} when unavailable."""
    if device.type != "cuda":
        return dict
    try:
        import pynvml
    except ImportError:  # nvidia-ml-py is optional
        return dict
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
    except pynvml.NVMLError:  # no usable NVML (e.g. in some containers): simply not logged
        return dict
    return lambda: {"gpu_util": pynvml.nvmlDeviceGetUtilizationRates(handle).gpu,
                    "gpu_power_w": pynvml.nvmlDeviceGetPowerUsage(handle) / 1000}


__all__ = ["environment", "write_config", "gpu_monitor"]
