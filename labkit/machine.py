"""The machine a figure was measured on: CPU, usable cores and library versions.

Recorded beside every timing (the results store's `machine` column) and shown by
`labkit.setup()`, the doctor and the workshop kit.
"""
from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PACKAGES = ("tensorflow", "tf-keras", "tensorflow-model-optimization", "ai-edge-litert", "numpy")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict:
    out = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = "not installed"
    return out


def usable_cores() -> int:
    """The cores this process may run on (a container or `taskset` can allow fewer)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def machine_info() -> dict:
    """CPU, cores and library versions: recorded beside every timing."""
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "usable_cores": usable_cores(),
            **versions()}


def machine_string() -> str:
    """One line for the results store's `machine` column."""
    info = machine_info()
    return (f"{info['cpu']} | {info['usable_cores']} cores | TF {info['tensorflow']} | "
            f"tf-keras {info['tf-keras']} | LiteRT {info['ai-edge-litert']}")
