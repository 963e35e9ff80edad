"""The CUDA device's bookkeeping with torch.cuda swapped for a stand-in (the real one runs in test_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from batchfit.device import CudaDevice, SimulatedDevice

GIB = 1024**3


@pytest.fixture
def fake_cuda(monkeypatch):
    """A pretend 80 GiB card: 10 GiB free to the driver, this process holding 3 GiB (1 GiB in use)."""
    calls: dict[str, list] = {"fraction": []}
    stats = {
        "allocated_bytes.all.peak": 5 * GIB,
        "reserved_bytes.all.peak": 6 * GIB,
        "num_alloc_retries": 2,
        "num_ooms": 1,
    }
    cuda = torch.cuda
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(cuda, "current_device", lambda: 0)
    monkeypatch.setattr(cuda, "mem_get_info", lambda device=None: (10 * GIB, 80 * GIB))
    monkeypatch.setattr(cuda, "memory_reserved", lambda device=None: 3 * GIB)
    monkeypatch.setattr(cuda, "memory_allocated", lambda device=None: 1 * GIB)
    monkeypatch.setattr(cuda, "get_device_properties", lambda index: (_ for _ in ()).throw(RuntimeError("no nvml")))
    monkeypatch.setattr(cuda, "get_device_name", lambda index=None: "Pretend H100")
    monkeypatch.setattr(cuda, "get_per_process_memory_fraction", lambda device=None: 0.5)
    monkeypatch.setattr(cuda, "set_per_process_memory_fraction", lambda f, device=None: calls["fraction"].append(f))
    monkeypatch.setattr(cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(cuda, "memory_stats", lambda device=None: dict(stats))
    return calls, stats


def test_capacity_is_free_memory_plus_this_process_cache(fake_cuda):
    device = CudaDevice()
    assert device.capacity == 13 * GIB  # 10 free + 3 reserved by us (of which 1 in use)
    assert "Pretend H100" in device.description and "cuda:0" in device.description
    assert CudaDevice(memory=8 * GIB).capacity == 8 * GIB
    assert CudaDevice(memory=40 * GIB).capacity == 13 * GIB  # a cap cannot add memory


def test_memory_cap_sets_and_restores_the_allocator_fraction(fake_cuda):
    calls, _ = fake_cuda
    device = CudaDevice(memory=24 * GIB)
    with device.session():
        assert calls["fraction"] == [pytest.approx(24 / 80)]
    assert calls["fraction"][-1] == 0.5  # the user's own setting comes back
    with CudaDevice().session():
        pass
    assert len(calls["fraction"]) == 2  # no cap, no change


def test_measure_reads_the_allocator_statistics(fake_cuda):
    _, stats = fake_cuda
    device = CudaDevice()
    with device.measure() as measured:
        stats["num_alloc_retries"] = 5
    assert measured.peak_allocated == 5 * GIB and measured.peak_reserved == 6 * GIB
    assert measured.alloc_retries == 3
    assert device.num_ooms() == 1


def test_no_cuda_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="torch sees no CUDA GPU"):
        CudaDevice()


def test_simulated_device_rejects_unknown_compute():
    with pytest.raises(ValueError, match="compute='gpu'"):
        SimulatedDevice(GIB, compute="gpu")


def test_an_oom_while_emptying_the_cache_is_not_a_failure(fake_cuda, monkeypatch):
    device = CudaDevice()

    def flush_fails(message):
        def flush():
            raise RuntimeError(message)

        return flush

    monkeypatch.setattr(torch.cuda, "empty_cache", flush_fails("CUDA error: out of memory"))
    device.empty_cache()  # nothing freed, nothing to report: the next trial measures what is live
    monkeypatch.setattr(torch.cuda, "empty_cache", flush_fails("CUDA error: an illegal memory access"))
    with pytest.raises(RuntimeError, match="illegal memory access"):
        device.empty_cache()
