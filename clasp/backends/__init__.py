"""Backends: what runs the model's matrices on a kind of device, decided once at load.

A backend turns the runner's plain weights into matrix objects (clasp.matrices) of the kinds that
are fastest and exact enough on this machine, makes the draft's weight copy, owns the
measurements those choices rest on (calibrations), and prices a draft token and a verification
row for the draft controller (its cost model). The model's forward pass never asks which kinds
it got. CPU: clasp.backends.cpu; CUDA: clasp.backends.cuda; any other torch device (MPS):
clasp.backends.device.
"""

from __future__ import annotations


import torch

from clasp.backends.base import Backend, CostModel, LoadOptions


def for_device(device: torch.device) -> Backend:
    """The backend for a device."""
    if device.type == "cpu":
        from clasp.backends.cpu import CpuBackend

        return CpuBackend()
    if device.type == "cuda":
        from clasp.backends.cuda import CudaBackend

        return CudaBackend()
    from clasp.backends.device import DeviceBackend

    return DeviceBackend()


__all__ = ["Backend", "CostModel", "LoadOptions", "for_device"]
