"""server.server_optimizer: FedAvgM/FedAdam on the aggregated update, and a resume that continues it exactly."""

from pathlib import Path

import numpy as np
import pytest

from server.server_config import ServerOptimizerConfig
from server.server_optimizer import ServerOptimizer, ServerOptimizerError, state_path

SHAPES = [(3, 2), (2,)]


def updates(seed: int, rounds: int) -> list[list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [[rng.normal(size=shape).astype(np.float32) for shape in SHAPES] for _ in range(rounds)]


def test_none_adds_the_update_and_momentum_is_fedavgm():
    start = [np.ones(shape, np.float32) for shape in SHAPES]
    steps = updates(0, 3)
    plain = ServerOptimizer(ServerOptimizerConfig(), SHAPES)
    added = [s + u for s, u in zip(start, steps[0], strict=True)]
    assert all(np.array_equal(a, b) for a, b in zip(plain.apply(start, steps[0]), added, strict=True))
    momentum = ServerOptimizer(ServerOptimizerConfig(name="momentum", learning_rate=0.5, momentum=0.9), SHAPES,
                               Path("unused"))
    weights, velocity = start, [np.zeros(shape, np.float32) for shape in SHAPES]
    expected = start
    for update in steps:  # v = 0.9 v + Δ; w = w + 0.5 v (Hsu et al. 2019)
        weights = momentum.apply(weights, update)
        velocity = [0.9 * v + u for v, u in zip(velocity, update, strict=True)]
        expected = [w + 0.5 * v for w, v in zip(expected, velocity, strict=True)]
        assert all(np.allclose(a, b, atol=1e-6) for a, b in zip(weights, expected, strict=True))


@pytest.mark.parametrize("name", ["momentum", "adam"])
def test_a_resumed_run_continues_the_optimizer_exactly(tmp_path, name):
    config = ServerOptimizerConfig(name=name, learning_rate=0.1)
    steps = updates(1, 4)
    straight = ServerOptimizer(config, SHAPES, tmp_path / "straight")
    weights = [np.zeros(shape, np.float32) for shape in SHAPES]
    for round_, update in enumerate(steps, 1):
        weights = straight.apply(weights, update)
        straight.save(round_)
    first = ServerOptimizer(config, SHAPES, tmp_path / "run")
    resumed = [np.zeros(shape, np.float32) for shape in SHAPES]
    for round_, update in enumerate(steps[:2], 1):
        resumed = first.apply(resumed, update)
        first.save(round_)
    assert [p.name for p in state_path(tmp_path / "run", 2).parent.iterdir()] == ["round-0002.pt"]  # latest only
    second = ServerOptimizer(config, SHAPES, tmp_path / "run")  # a new server process: `fedpath-server resume`
    second.restore(2)
    for update in steps[2:]:
        resumed = second.apply(resumed, update)
    assert all(np.array_equal(a, b) for a, b in zip(resumed, weights, strict=True))


def test_a_resume_without_the_optimizer_state_is_refused(tmp_path):
    optimizer = ServerOptimizer(ServerOptimizerConfig(name="momentum"), SHAPES, tmp_path)
    optimizer.restore(0)  # a new run has nothing to restore
    with pytest.raises(ServerOptimizerError, match=r"round-0003.pt: missing.*server_optimizer"):
        optimizer.restore(3)
    optimizer.save(3)
    with pytest.raises(ServerOptimizerError, match="expected 'adam'"):
        ServerOptimizer(ServerOptimizerConfig(name="adam"), SHAPES, tmp_path).restore(3)
