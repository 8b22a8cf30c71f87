"""Whether this machine can use a device, and how much memory an allocation there can get.

Checked before a model is loaded onto the device, so that a device named in a config that this
machine lacks fails with a typed error saying so, not with torch's assertion from deep inside
the first allocation.
"""

from __future__ import annotations

import os

import torch

from medha.errors import DeviceUnavailableError


def check_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device; DeviceUnavailableError if it is not one this machine has."""
    try:
        parsed = torch.device(device)
    except RuntimeError as exc:  # torch's message lists ~20 device types: too long to repeat
        raise DeviceUnavailableError(
            f"unknown device {str(device)!r} (use 'cpu', 'cuda' or 'cuda:N')"
        ) from exc
    if parsed.type == "cpu":
        return parsed
    if parsed.type == "meta":  # allocates, but holds no data: nothing could run there
        raise DeviceUnavailableError(
            f"device {str(device)!r} holds no data and cannot run a model (use 'cpu' or 'cuda')"
        )
    problem = _cuda_problem(parsed) if parsed.type == "cuda" else _allocation_problem(parsed)
    if problem is not None:
        raise DeviceUnavailableError(f"device {str(device)!r} is not available: {problem}")
    return parsed


def _cuda_problem(device: torch.device) -> str | None:
    if not torch.cuda.is_available():
        if torch.version.cuda is None and torch.version.hip is None:
            return "this torch build has no CUDA support (a CPU-only wheel)"
        return "no CUDA device is visible (check the driver and CUDA_VISIBLE_DEVICES)"
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        return f"this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
    return None


def _allocation_problem(device: torch.device) -> str | None:
    # Other device types (mps, xpu, ...) each have their own availability call; an empty
    # allocation asks all of them the same way, and fails the way the model load would.
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError):  # torch's own message runs to a page of backends
        return "this torch build or machine cannot allocate memory there"
    return None


def memory_bytes(device: torch.device) -> int | None:
    """The most a new allocation on `device` can get: on a CPU, the memory available now
    (within the container's limit), or a CUDA device's free memory plus what torch's allocator
    holds unused; None where unknown."""
    if device.type == "cpu":
        return _cpu_room()
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + unused)
    return None


def _cpu_room() -> int | None:
    """The least of what Linux says is available (MemAvailable: free memory plus what the page
    cache would give back; the weights loaded already are not in it), what the cgroup v2 limit
    leaves of a container's memory, and the physical memory; None where none is known. A KV
    pool past this either fails to allocate or, overcommitted, gets the process killed once
    its pages are touched."""
    known = [
        room for room in (_meminfo_available(), _cgroup_room(), _physical()) if room is not None
    ]
    return min(known) if known else None


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_room(root: str = "/sys/fs/cgroup") -> int | None:
    """What the cgroup v2 limit leaves: limit - usage, where usage counts the page cache (the
    weights just read) and the kernel gives its inactive part back before it refuses memory."""
    try:
        with open(f"{root}/memory.max") as limit, open(f"{root}/memory.current") as current:
            text = limit.read().strip()
            if text == "max":
                return None
            used = int(current.read())
    except (OSError, ValueError):
        return None
    return max(0, int(text) - used + _inactive_file_bytes(root))


def _inactive_file_bytes(root: str) -> int:
    try:
        with open(f"{root}/memory.stat") as stat:
            for line in stat:
                key, _, value = line.partition(" ")
                if key == "inactive_file":
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _physical() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not every platform names these
        return None
