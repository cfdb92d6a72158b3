"""RecurrentCore: same maths as torch's layers, exact per-sample gradients under Opacus."""

import warnings

import pytest
import torch
from opacus import GradSampleModule, PrivacyEngine
from opacus.layers import DPGRU, DPLSTM, DPRNN
from opacus.validators import ModuleValidator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from shared.recurrent import RecurrentCore
from shared.recurrent_grad_sampler import compute_recurrent_core_grad_sample

KINDS = ["rnn", "lstm", "gru"]
TORCH_LAYER = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
OPACUS_LAYER = {"rnn": DPRNN, "lstm": DPLSTM, "gru": DPGRU}
IN, PROJ, HIDDEN, T = 16, 8, 6, 7

pytestmark = pytest.mark.filterwarnings(
    # Opacus' hooks on the first layer, whose input needs no grad; secure-RNG notice.
    "ignore:Full backward hook is firing:UserWarning",
    "ignore:Secure RNG turned off:UserWarning",
)


class Head(nn.Module):
    """Linear -> recurrent layer -> last step -> Linear, like the project's sequence head."""

    def __init__(self, core: nn.Module) -> None:
        super().__init__()
        self.proj = nn.Linear(IN, PROJ)
        self.core = core
        self.fc = nn.Linear(HIDDEN, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.core(self.proj(x))
        if isinstance(out, tuple):  # torch's and Opacus' layers return (output, state)
            out = out[0]
        return self.fc(out[:, -1])


def make_pair(kind: str, reference: type):
    """Our head and an identical one with ``reference`` as its recurrent layer."""
    ours = Head(RecurrentCore(kind, PROJ, HIDDEN))
    ref = Head(reference(PROJ, HIDDEN, batch_first=True))
    # Load per child: Opacus' DP layers map `weight_ih_l0`-style keys only at their own level.
    for name in ("proj", "core", "fc"):
        getattr(ref, name).load_state_dict(getattr(ours, name).state_dict())
    return ours, ref


def per_sample_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    gsm = GradSampleModule(model, loss_reduction="sum")
    nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
    grads = {name: p.grad_sample.clone() for name, p in model.named_parameters()}
    gsm.remove_hooks()
    return grads


def batch(size: int, seed: int = 0, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(size, T, IN, generator=g, dtype=dtype)
    return x, torch.randint(0, 2, (size,), generator=g)


@pytest.mark.parametrize("kind", KINDS)
def test_same_parameters_and_output_as_torch_layer(kind):
    torch.manual_seed(0)
    reference = TORCH_LAYER[kind](IN, HIDDEN, batch_first=True)
    torch.manual_seed(0)
    core = RecurrentCore(kind, IN, HIDDEN)
    # Same names, shapes and default initialisation (same RNG draws in the same order).
    assert list(core.state_dict()) == list(reference.state_dict())
    for name, p in core.state_dict().items():
        torch.testing.assert_close(p, reference.state_dict()[name], rtol=0, atol=0)

    core.load_state_dict(reference.state_dict())
    x = torch.randn(4, T, IN)
    torch.testing.assert_close(core(x), reference(x)[0], rtol=0, atol=1e-6)


def test_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        RecurrentCore("transformer", 4, 4)


@pytest.mark.parametrize("kind", KINDS)
def test_per_sample_grads_match_opacus_dp_layers(kind):
    # float32, the training dtype: agreement is ~1e-7 relative.
    ours, ref = make_pair(kind, OPACUS_LAYER[kind])
    x, y = batch(5)
    got, want = per_sample_grads(ours, x, y), per_sample_grads(ref, x, y)
    assert got.keys() == want.keys()
    for name in got:
        assert got[name].shape == (5, *dict(ours.named_parameters())[name].shape)
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind", KINDS)
def test_per_sample_grads_match_single_sample_autograd(kind):
    # float64 and tight tolerances: the sampler is exact, not an approximation.
    torch.manual_seed(1)
    model = Head(RecurrentCore(kind, PROJ, HIDDEN)).double()
    x, y = batch(4, seed=1, dtype=torch.float64)
    got = per_sample_grads(model, x, y)
    for i in range(len(x)):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(got[name][i], p.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_grad_sampler_is_registered_and_used(monkeypatch):
    # Without it Opacus would silently fall back to functorch (vmap over the fused op).
    assert GradSampleModule.GRAD_SAMPLERS[RecurrentCore] is compute_recurrent_core_grad_sample
    calls = []

    def spy(layer, activations, backprops):
        calls.append(backprops.shape)
        return compute_recurrent_core_grad_sample(layer, activations, backprops)

    monkeypatch.setitem(GradSampleModule.GRAD_SAMPLERS, RecurrentCore, spy)
    per_sample_grads(Head(RecurrentCore("gru", PROJ, HIDDEN)), *batch(3))
    assert calls == [(3, T, HIDDEN)]


@pytest.mark.parametrize("kind", KINDS)
def test_empty_batch(kind):
    model = Head(RecurrentCore(kind, PROJ, HIDDEN))
    assert model.core(torch.zeros(0, T, PROJ)).shape == (0, T, HIDDEN)
    grads = per_sample_grads(model, *batch(0))
    for name, p in model.named_parameters():
        assert grads[name].shape == (0, *p.shape)


def test_make_private_trains_with_validator_clean_model():
    torch.manual_seed(0)
    model = Head(RecurrentCore("gru", PROJ, HIDDEN))
    assert ModuleValidator.validate(model, strict=False) == []
    x, y = torch.randn(32, T, IN), torch.randint(0, 2, (32,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, optimizer, loader = PrivacyEngine().make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(TensorDataset(x, y), batch_size=4),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            poisson_sampling=True,
        )
    before = model._module.core.weight_hh_l0.detach().clone()
    # One explicit empty batch (Poisson sampling produces them), then a real epoch.
    batches = [(x[:0], y[:0]), *loader]
    for xb, yb in batches:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        optimizer.step()
    assert torch.isfinite(model._module.core.weight_hh_l0).all()
    assert not torch.equal(model._module.core.weight_hh_l0, before)
