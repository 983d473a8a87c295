"""Every collective runs on the process's communication device (pte.training.collectives), proved on a CPU-only machine.

NCCL, which Lightning starts for CUDA training, refuses CPU tensors; gloo, which the other multi-process tests use,
takes either device, so those tests cannot see a collective fed from the wrong device. Here two forked gloo ranks
pretend to be NCCL ranks on cuda:0: a torch function mode turns tensors created on or moved to "cuda" into a CPU
tensor subclass that reports cuda:0 (``.cpu()`` and ``.to("cpu")`` unwrap it), the backend reports "nccl", and
``all_reduce`` / ``broadcast`` refuse any tensor not on that device, as NCCL does, before running gloo on the data
underneath. Each step-level collective then runs with the inputs a real step gives it: rewards on the CPU (the
reward function's output), gradients, parameters, the module's checks and the lock-step flags on the device.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.overrides import TorchFunctionMode

from pte.training.collectives import all_max, all_mean, all_sum, broadcast_, comm_device, gather_object
from pte.training.distributed import ReplayDDPStrategy, global_step_totals, reduce_gradients
from pte.training.lockstep import most_over_ranks, running_anywhere
from pte.training.module import GRPOModule
from tests.test_distributed import WORLD, _ranks_results

SIM = torch.device("cuda", 0)


class OnSim(torch.Tensor):
    """A CPU tensor that reports the simulated device; results of operations on it stay on it."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func == torch.Tensor.device.__get__:
            return SIM
        return super().__torch_function__(func, types, args, kwargs or {})


def _is_sim(device: Any) -> bool:
    return isinstance(device, (str, torch.device)) and torch.device(device).type == "cuda"


def _move(src: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """``Tensor.to`` on the simulated device: a copy when the data changes device, as on a real one."""
    device, dtype = kwargs.get("device"), kwargs.get("dtype")
    for arg in args:
        if isinstance(arg, torch.Tensor):
            device, dtype = arg.device, arg.dtype
        elif isinstance(arg, torch.dtype):
            dtype = arg
        elif isinstance(arg, (str, torch.device)):
            device = arg
    if device is None:
        return torch.Tensor.to(src, *args, **kwargs)
    to_sim = _is_sim(device)
    copy = kwargs.get("copy", False) or to_sim != isinstance(src, OnSim)
    out = src.as_subclass(torch.Tensor).to(dtype=dtype or src.dtype, copy=copy)
    return out.as_subclass(OnSim) if to_sim else out


class SimulatedCuda(TorchFunctionMode):
    """Tensors created with ``device="cuda"`` or moved there become :class:`OnSim`; moves to the CPU unwrap them."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.to:
            return _move(args[0], args[1:], kwargs)
        if func is torch.Tensor.cpu:
            return _move(args[0], ("cpu",), {})
        if func is torch.Tensor.cuda:
            return _move(args[0], (SIM,), {})
        if _is_sim(kwargs.get("device")):
            kwargs["device"] = "cpu"
            return func(*args, **kwargs).as_subclass(OnSim)
        return func(*args, **kwargs)


def _device_only(real: Callable) -> Callable:
    """``real`` (a gloo collective on one tensor) behind NCCL's checks: device tensors only, and ``ReduceOp.AVG``."""

    def collective(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(tensor, OnSim):
            raise RuntimeError(f"No backend type associated with device type {tensor.device.type}")  # noqa: TRY004 - as NCCL
        data = tensor.as_subclass(torch.Tensor)  # the same memory: the in-place result lands in ``tensor``
        if kwargs.get("op") == dist.ReduceOp.AVG:
            real(data, *args, **{**kwargs, "op": dist.ReduceOp.SUM})
            data.div_(dist.get_world_size())
            return None
        return real(data, *args, **kwargs)

    return collective


@contextlib.contextmanager
def pretend_nccl() -> Iterator[None]:
    """Run the block as an NCCL rank on cuda:0 of the process group already started with gloo."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(dist, "get_backend", lambda group=None: "nccl"))
        stack.enter_context(mock.patch.object(torch.cuda, "current_device", lambda: 0))
        for name in ("all_reduce", "broadcast"):
            stack.enter_context(mock.patch.object(dist, name, _device_only(getattr(dist, name))))
        stack.enter_context(SimulatedCuda())
        yield


# --- one step's collectives, with the inputs a step gives them ----------------------------------------------------


def _placed(t: torch.Tensor) -> tuple[str, list]:
    return str(t.device), t.tolist()


def _raw_cpu_collective(rank: int) -> Any:
    """The harness itself: a CPU tensor straight into all_reduce must fail, as under NCCL."""
    dist.all_reduce(torch.ones(1))


def _sums(rank: int) -> Any:
    return [_placed(f(torch.tensor([rank + 1.0], device=d))) for f in (all_sum, all_mean) for d in (SIM, "cpu")]


def _maximum(rank: int) -> Any:
    return _placed(all_max(torch.tensor([rank, -rank], device=SIM)))


def _step_totals(rank: int) -> Any:
    rewards = torch.tensor([float(rank), rank + 0.5])  # from the reward function: on the CPU
    stats = {"loss": rank + 1.0, "gap_max": 5.0 - rank}
    rewards_all, parts, stats = global_step_totals(rewards, {"correctness": rewards > 0}, stats, frozenset({"gap_max"}))
    return _placed(rewards_all), _placed(parts["correctness"]), stats


def _gradients(rank: int) -> Any:
    params = [nn.Parameter(torch.zeros(3, device=SIM)), nn.Parameter(torch.zeros(2, device=SIM))]
    params[0].grad = torch.full((3,), rank + 1.0, device=SIM)
    if rank == 1:
        params[1].grad = torch.ones(2, device=SIM)
    reduce_gradients(params)
    return [_placed(p.grad) for p in params]


def _object(rank: int) -> dict:
    """What a rank gathers, e.g. its sampler state (a CPU byte tensor, whatever the device of its generator)."""
    return {"rank": rank, "rng": torch.Generator().manual_seed(rank).get_state()[:8].tolist()}


def _objects(rank: int) -> Any:
    return gather_object(_object(rank))


def _lockstep(rank: int) -> Any:
    alive = torch.tensor([False, rank == 1], device=SIM)
    return running_anywhere(alive, True), running_anywhere(alive, False), most_over_ranks([rank + 1, 3 - rank], True)


def _module_view() -> SimpleNamespace:
    """What GRPOModule's reductions read from the module: its device, the trainer's strategy and the loggers."""
    return SimpleNamespace(
        device=SIM,
        trainer=SimpleNamespace(strategy=ReplayDDPStrategy()),
        log_dict=lambda *a, **k: None,
        log=lambda *a, **k: None,
    )


def _module_checks(rank: int) -> Any:
    module = _module_view()
    grad_norm = torch.tensor(2.0, device=SIM)
    loss = math.inf if rank else 1.0
    finite = GRPOModule._all_finite(module, 1.0, grad_norm), GRPOModule._all_finite(module, loss, grad_norm)
    logs = {"accuracy": torch.tensor(float(rank)), "grad_norm": float(grad_norm), "loss": torch.tensor(rank * 2.0)}
    GRPOModule._publish(module, logs)
    return finite, module.step_metrics


def _broadcast(rank: int) -> Any:
    model = nn.Module()
    model.adapter = nn.Parameter(torch.full((2,), rank + 1.0, device=SIM))
    model.base = nn.Parameter(torch.full((2,), rank + 1.0, device=SIM), requires_grad=False)
    ReplayDDPStrategy.configure_ddp(SimpleNamespace(model=model))
    cpu = torch.full((1,), rank + 5.0)
    broadcast_(cpu)
    return _placed(model.adapter.data), _placed(model.base.data), _placed(cpu)


NCCL_REFUSAL = "No backend type associated with device type cpu"
CHECKS: dict[str, tuple[Callable[[int], Any], list[Any]]] = {  # name: (check, what each rank must get)
    "sums": (_sums, [[("cuda:0", [3.0]), ("cpu", [3.0]), ("cuda:0", [1.5]), ("cpu", [1.5])]] * WORLD),
    "maximum": (_maximum, [("cuda:0", [1, 0])] * WORLD),
    "step_totals": (
        _step_totals,
        [(("cpu", [0.0, 0.5, 1.0, 1.5]), ("cpu", [False, True, True, True]), {"loss": 3.0, "gap_max": 5.0})] * 2,
    ),
    "gradients": (_gradients, [[("cuda:0", [3.0, 3.0, 3.0]), ("cuda:0", [1.0, 1.0])]] * WORLD),
    "objects": (_objects, [[_object(0), _object(1)]] * WORLD),
    "lockstep": (_lockstep, [(True, False, [2, 3]), (True, True, [2, 3])]),
    "module": (
        _module_checks,
        [((True, False), {"train/accuracy": 0.5, "train/grad_norm": 2.0, "train/loss": 1.0})] * 2,
    ),
    "broadcast": (_broadcast, [(("cuda:0", [1.0, 1.0]), ("cuda:0", [r + 1.0] * 2), ("cpu", [5.0])) for r in range(2)]),
}


def _outcome(check: Callable[[int], Any], rank: int) -> tuple[str, Any]:
    try:
        return "ok", check(rank)
    except Exception as err:  # noqa: BLE001 - recorded: every check runs, each test reports its own failure
        return "error", f"{type(err).__name__}: {err}"


def _worker(rank: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", f"file://{store}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    with pretend_nccl():
        results = {"raw_cpu": _outcome(_raw_cpu_collective, rank)}
        results.update({name: _outcome(check, rank) for name, (check, _) in CHECKS.items()})
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return _ranks_results(_worker, tmp_path_factory.mktemp("nccl"))["ranks"]


def test_the_simulated_backend_refuses_cpu_tensors(ranks):
    assert all(r["raw_cpu"] == ("error", f"RuntimeError: {NCCL_REFUSAL}") for r in ranks)


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_collectives_run_on_the_process_device(ranks, name):
    expected = CHECKS[name][1]
    assert [r[name] for r in ranks] == [("ok", e) for e in expected]


# --- the device rule and the single process -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("backend", "device"),
    [("nccl", torch.device("cuda", 1)), ("cpu:gloo,cuda:nccl", torch.device("cuda", 1)), ("gloo", torch.device("cpu"))],
)
def test_comm_device_follows_the_backend(monkeypatch, backend, device):
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert comm_device() == device


def test_one_process_runs_no_collective(monkeypatch):
    monkeypatch.setattr(dist, "all_reduce", None)
    monkeypatch.setattr(dist, "broadcast", None)
    value = torch.tensor([1.0, 2.0])
    assert all_sum(value) is value and all_max(value) is value
    assert torch.equal(all_mean(value), value) and gather_object("x") == ["x"]
    broadcast_(value)
    assert most_over_ranks([1, 2], True) == [1, 2] and running_anywhere(torch.tensor([True]), True)
