"""The server's own optimizer step on the aggregated update (FedOpt: Reddi et al., ICLR 2021).

Sites send updates and the server reads only their patient-weighted mean Δ (under SecAgg+ the
masked sum). Plain FedAvg adds Δ to the global model. A server optimizer instead treats −Δ as the
gradient of the global parameters and takes a step of ``torch.optim.SGD`` with momentum (FedAvgM)
or ``torch.optim.Adam`` (FedAdam). It acts on the aggregate only: it composes with SecAgg+, needs
no site's own update, and costs no privacy (post-processing of DP releases). Measured under DP
(``docs/benchmarks.md``, ``dp_levers_small``): momentum helps small hospitals (+1.9 points alone at
ε = 3, best together with the frozen projection) and changes nothing with sites of a few hundred items.

Flower's FedAvgM/FedAdam strategies expect absolute weights, not fedpath's deltas, hence this
module. Its state (momentum buffers, Adam moments, step counts) is saved beside every checkpoint
(``checkpoints/server-optimizer/round-NNNN.pt``) so that ``fedpath-server resume`` continues it
exactly: a resume that finds no state for its latest checkpoint refuses rather than restart it.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from shared.atomic_files import atomic_write
from shared.errors import UserError
from shared.parameters import add

OptimizerFactory = Callable[[list[torch.Tensor], "object"], torch.optim.Optimizer]

SERVER_OPTIMIZERS: dict[str, OptimizerFactory | None] = {
    "none": None,  # FedAvg: the global model plus the aggregated update
    "momentum": lambda params, c: torch.optim.SGD(params, lr=c.learning_rate, momentum=c.momentum),
    "adam": lambda params, c: torch.optim.Adam(params, lr=c.learning_rate, betas=(c.momentum, c.beta2), eps=c.tau),
}
"""Registry of server optimizers by ``strategy.server_optimizer.name``: factories of a torch optimizer
over the global parameters from the config section."""


class ServerOptimizerError(UserError):
    """The optimizer's saved state is missing or does not fit the run."""


def state_path(run_dir: Path, round_: int) -> Path:
    return Path(run_dir) / "checkpoints" / "server-optimizer" / f"round-{round_:04d}.pt"


class ServerOptimizer:
    """Applies the aggregated update to the global model, through the configured optimizer.

    Args:
        config: ``strategy.server_optimizer`` (name, learning_rate, momentum, beta2, tau).
        shapes: the global parameters' shapes, in wire order.
        run_dir: the run folder its state is saved in and restored from (needed unless ``none``).
    """

    def __init__(self, config, shapes: Sequence[tuple[int, ...]], run_dir: Path | None = None) -> None:
        self.config, self.run_dir = config, None if run_dir is None else Path(run_dir)
        factory = SERVER_OPTIMIZERS[config.name]
        if factory is not None and run_dir is None:
            raise ValueError(f"server optimizer {config.name!r} needs the run folder to keep its state in")
        self.params = [torch.zeros(shape, dtype=torch.float32, requires_grad=True) for shape in shapes]
        self.optimizer = None if factory is None else factory(self.params, config)

    def apply(self, global_arrays: Sequence[np.ndarray], update: Sequence[np.ndarray]) -> list[np.ndarray]:
        """The new global model: ``global + update`` without an optimizer, else one step with gradient −update."""
        if self.optimizer is None:
            return add(global_arrays, update)
        with torch.no_grad():
            for param, array, delta in zip(self.params, global_arrays, update, strict=True):
                param.copy_(torch.from_numpy(np.asarray(array, dtype=np.float32)))
                param.grad = -torch.from_numpy(np.asarray(delta, dtype=np.float32)).clone()
        self.optimizer.step()
        return [param.detach().numpy().copy() for param in self.params]

    def save(self, round_: int) -> None:
        """The optimizer's state after ``round_``; earlier rounds' states are removed (only the latest resumes)."""
        if self.optimizer is None:
            return
        path = state_path(self.run_dir, round_)
        path.parent.mkdir(parents=True, exist_ok=True)
        document = {"name": self.config.name, "round": round_, "state": self.optimizer.state_dict()}
        atomic_write(path, functools.partial(torch.save, document))
        for older in path.parent.glob("round-*.pt"):
            if older.name < path.name:
                older.unlink(missing_ok=True)

    def restore(self, round_: int) -> None:
        """Continue from the state saved after ``round_`` (nothing to restore at round 0)."""
        if self.optimizer is None or round_ == 0:
            return
        path = state_path(self.run_dir, round_)
        try:
            document = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise ServerOptimizerError(
                f"{path}: missing; the run's server optimizer ({self.config.name}) cannot continue exactly from "
                f"round {round_}. Resume with the strategy.server_optimizer the run was started with") from None
        except Exception as exc:
            raise ServerOptimizerError(f"{path}: unreadable ({exc.__class__.__name__}); the run cannot resume "
                                       "its server optimizer exactly") from None
        if document.get("name") != self.config.name or document.get("round") != round_:
            raise ServerOptimizerError(f"{path}: state of optimizer {document.get('name')!r} after round "
                                       f"{document.get('round')}, expected {self.config.name!r} after round {round_}")
        self.optimizer.load_state_dict(document["state"])
