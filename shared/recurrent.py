"""Recurrent core (tanh RNN, LSTM or GRU) that trains fast under Opacus DP-SGD.

Opacus' own ``DPRNN`` / ``DPLSTM`` / ``DPGRU`` run the recurrence as a Python
loop over time steps with hooks on every step, which makes them 24-34x slower
than the native layers. :class:`RecurrentCore` instead runs the sequence with
torch's own ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` (their fused sequence op) on
its parameters, so without DP it is as fast as those, and registers an Opacus
grad sampler that computes exact per-sample gradients by backpropagation
through time written out by hand:

1. Recompute the outputs ``h`` with the same layer (no graph), the input
   projection ``A = x @ W_ih^T + b_ih`` and the hidden projection
   ``G_h = h_{t-1} @ W_hh^T + b_hh`` for all steps at once, and from them every
   gate's local derivative (``_*_local``), also for all steps at once.
2. Walk back over time (``_*_step``): per step only one small matmul and a few
   elementwise ops, to get ``dA_t`` and ``dG_h,t``, the loss gradients w.r.t.
   the two projections, for each sample.
3. ``W_ih, b_ih`` enter only through ``A`` and ``W_hh, b_hh`` only through
   ``G_h``, so their per-sample gradients are ``einsum('btg,btd->bgd', dA, x)``,
   ``dA.sum(1)``, ``einsum('btg,bth->bgh', dG_h, h_prev)``, ``dG_h.sum(1)``.

It records no graph and calls no re-entrant backward from inside Opacus' hook.
An earlier version got ``dA`` from ``autograd.grad`` through the fused op run
on ``A`` with an identity input weight; it was exact too, but 25-35% slower
for the GRU and LSTM. The tests check the sampler against Opacus' DP layers and
against per-sample autograd.
"""

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_TORCH_LAYERS = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}  # nn.RNN's nonlinearity is tanh by default
_PARAMETERS = ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0")


# Backpropagation through time, per kind. `_*_local(a, gh, h, h_prev)` takes the input
# projection A, the hidden projection G_h, the outputs h_t and h_{t-1} (all [B, T, .])
# and returns local derivatives for all steps. `_*_step(dh, dc, *local_t)` takes the
# loss gradient w.r.t. h_t (and, for the LSTM, the cell-state gradient coming back from
# step t+1) and returns (dA_t, dG_h,t, the part of dh_{t-1} not through W_hh, dc for
# step t-1). Gate order is torch's: LSTM (i, f, g, o), GRU (r, z, n).


def _rnn_local(a: Tensor, gh: Tensor, h: Tensor, h_prev: Tensor):
    # h = tanh(A + G_h)
    return (1 - h * h,)


def _rnn_step(dh: Tensor, dc: Tensor, tanh_grad: Tensor):
    d_pre = dh * tanh_grad
    return d_pre, d_pre, 0, dc


def _lstm_local(a: Tensor, gh: Tensor, h: Tensor, h_prev: Tensor):
    # c_t = f c_{t-1} + i g,  h_t = o tanh(c_t),  (i, f, g, o) = act(A + G_h)
    i, f, g, o = (a + gh).chunk(4, dim=-1)
    i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
    ig = i * g
    c = [ig[:, 0]]
    for t in range(1, a.shape[1]):
        c.append(torch.addcmul(ig[:, t], f[:, t], c[-1]))
    c = torch.stack(c, dim=1)
    c_prev = F.pad(c, (0, 0, 1, 0))[:, :-1]
    tanh_c = c.tanh()
    # d(pre-activation) = [dc, dc, dc, dh] * gate_grads
    gate_grads = torch.cat(
        [g * i * (1 - i), c_prev * f * (1 - f), i * (1 - g * g), tanh_c * o * (1 - o)], dim=-1
    )
    return o * (1 - tanh_c * tanh_c), f, gate_grads


def _lstm_step(dh: Tensor, dc_next: Tensor, dc_dh: Tensor, f: Tensor, gate_grads: Tensor):
    dc = torch.addcmul(dc_next, dh, dc_dh)
    d_pre = torch.cat([dc, dc, dc, dh], dim=-1) * gate_grads
    return d_pre, d_pre, 0, dc * f


def _gru_local(a: Tensor, gh: Tensor, h: Tensor, h_prev: Tensor):
    # (r, z) = sigmoid(A + G_h),  n = tanh(A_n + r G_h,n),  h_t = (1 - z) n + z h_{t-1}
    size = h.shape[-1]
    r, z = (a[..., : 2 * size] + gh[..., : 2 * size]).sigmoid().chunk(2, dim=-1)
    gh_n = gh[..., 2 * size :]
    n = torch.tanh(a[..., 2 * size :] + r * gh_n)
    dn_pre = (1 - z) * (1 - n * n)
    # dA = dh * gate_grads; dG_h equals dA except its n part, which is scaled by r.
    gate_grads = torch.cat(
        [dn_pre * gh_n * r * (1 - r), (h_prev - n) * z * (1 - z), dn_pre], dim=-1
    )
    return gate_grads, r, z


def _gru_step(dh: Tensor, dc: Tensor, gate_grads: Tensor, r: Tensor, z: Tensor):
    d_a = dh.repeat(1, 3) * gate_grads
    size = dh.shape[-1]
    d_gh = torch.cat([d_a[:, : 2 * size], d_a[:, 2 * size :] * r], dim=-1)
    return d_a, d_gh, dh * z, dc


_CELLS = {
    "rnn": (_rnn_local, _rnn_step, 1),
    "lstm": (_lstm_local, _lstm_step, 4),
    "gru": (_gru_local, _gru_step, 3),
}


class RecurrentCore(nn.Module):
    """One-layer, unidirectional, batch-first tanh RNN, LSTM or GRU.

    Parameters have the names, shapes, gate layout and default initialisation of
    ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` (and of Opacus' ``DPRNN`` / ``DPLSTM`` /
    ``DPGRU``), so their ``state_dict`` loads here and vice versa. Unlike those,
    :meth:`forward` returns only the output sequence (a single tensor, which is
    what Opacus' backward hooks need) and always starts from a zero state.

    Args:
        kind: ``"rnn"`` (tanh), ``"lstm"`` or ``"gru"``.
        input_size: features per time step of the input.
        hidden_size: features of the hidden state and of the output.
    """

    def __init__(self, kind: str, input_size: int, hidden_size: int) -> None:
        super().__init__()
        if kind not in _CELLS:
            raise ValueError(f"kind must be one of {sorted(_CELLS)}, got {kind!r}")
        self.kind = kind
        self.input_size = input_size
        self.hidden_size = hidden_size
        gates = _CELLS[kind][2] * hidden_size
        self.weight_ih_l0 = nn.Parameter(torch.empty(gates, input_size))
        self.weight_hh_l0 = nn.Parameter(torch.empty(gates, hidden_size))
        self.bias_ih_l0 = nn.Parameter(torch.empty(gates))
        self.bias_hh_l0 = nn.Parameter(torch.empty(gates))
        self.reset_parameters()
        # torch's own layer of the same kind and size runs the sequence on this module's Parameter
        # objects (``outputs``). On the meta device it allocates nothing and draws nothing from the
        # random generator. It stays out of the module tree (set through __dict__), so that Opacus,
        # state_dict and optimisers see each parameter once, here, where the grad sampler is.
        # Measured against calling the same fused op through torch._VF (private; what this replaced),
        # 2026-12-01, 2 shared cores, one thread, the same batch of 16 x 8 x 128, interleaved blocks of
        # 100 calls, median CPU time per call over four runs: +50-135 us without a graph (the grad
        # sampler's call), +15-280 us forward and backward (GRU the most). A training step at batch 16
        # takes 7.7-9.7 ms without DP and 19-31 ms with it, so the public layer costs 0.8-1.3 % of a DP
        # step and 1.2-2.9 % of a step without DP: within "a few percent", and the DP-overhead ratio
        # does not get worse. torch.func.functional_call on a template cost +110-460 us per call.
        self.__dict__["_torch_layer"] = _TORCH_LAYERS[kind](input_size, hidden_size, batch_first=True,
                                                             device="meta")

    def reset_parameters(self) -> None:
        """Same as ``nn.RNNBase``: U(-1/sqrt(H), 1/sqrt(H)), in the same order, so a
        given seed yields the same weights as the torch layer."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``x`` [B, T, input_size] to the output sequence [B, T, hidden_size]."""
        return self.outputs(x)

    def outputs(self, x: Tensor) -> Tensor:
        """The output sequence [B, T, hidden_size] from a zero state, by torch's own layer on this
        module's parameters (also what the grad sampler recomputes, without a graph)."""
        layer = self._torch_layer
        for name in _PARAMETERS:  # this module's current Parameter objects (meta placeholders until the first call)
            if getattr(layer, name) is not getattr(self, name):
                setattr(layer, name, getattr(self, name))
        if layer.training != self.training:  # only a dropout would care; there is none
            layer.train(self.training)
        return layer(x)[0]

    def extra_repr(self) -> str:
        return f"{self.kind}, {self.input_size}, {self.hidden_size}"
