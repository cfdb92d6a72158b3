"""Recurrent core (tanh RNN, LSTM or GRU) that trains fast under Opacus DP-SGD.

Opacus' own ``DPRNN`` / ``DPLSTM`` / ``DPGRU`` run the recurrence as a Python
loop over time steps with hooks on every step, which makes them 24-34x slower
than the native layers. :class:`RecurrentCore` runs forward and backward with
torch's fused sequence ops (``torch._VF.rnn_tanh`` / ``lstm`` / ``gru``, the
ops behind ``nn.RNN`` / ``nn.LSTM`` / ``nn.GRU``) and registers an Opacus grad
sampler that computes exact per-sample gradients without any Python loop over
time:

1. Recompute the input projection ``A = x @ W_ih^T + b_ih`` (all steps at once)
   and run the fused op on ``A`` with an identity input weight and zero input
   bias; one ``autograd.grad`` through it gives ``dA = dL/dA`` for every sample
   and step.
2. ``W_ih`` and ``b_ih`` enter only through ``A``, so their per-sample
   gradients are ``einsum('btg,btd->bgd', dA, x)`` and ``dA.sum(1)``.
3. ``W_hh`` and ``b_hh`` enter through ``G_h = h_{t-1} @ W_hh^T + b_hh``. For
   the tanh RNN and the LSTM, ``G_h`` is simply added to ``A``, so
   ``dG_h = dA``; for the GRU the candidate gate uses ``r * G_h[n]``, so that
   slice is scaled by the reset gate ``r`` (recomputed from the outputs in one
   matmul). Then ``einsum('btg,bth->bgh', dG_h, h_prev)`` and ``dG_h.sum(1)``.

Calling ``autograd.grad`` from inside Opacus' backward hook is a re-entrant
backward on a graph detached from the model's, which autograd supports; grad
mode is off during backward, so it is switched on explicitly.
"""

import math
from typing import Dict, List

import torch
import torch.nn.functional as F
from opacus.grad_sample import register_grad_sampler
from torch import Tensor, nn

_GATES = {"rnn": 1, "lstm": 4, "gru": 3}


def _fused_sequence(kind: str, x: Tensor, weights: List[Tensor], train: bool) -> Tensor:
    """Output sequence [B, T, H] of torch's fused one-layer op, initial state zeros.

    ``train`` must be True when a backward will follow (cuDNN refuses a backward
    through an op run in inference mode).
    """
    h0 = x.new_zeros(1, x.shape[0], weights[1].shape[1])
    # Positional args after the weights: has_biases, num_layers, dropout, train,
    # bidirectional, batch_first.
    if kind == "lstm":
        return torch._VF.lstm(x, (h0, h0), weights, True, 1, 0.0, train, False, True)[0]
    op = torch._VF.rnn_tanh if kind == "rnn" else torch._VF.gru
    return op(x, h0, weights, True, 1, 0.0, train, False, True)[0]


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
        if kind not in _GATES:
            raise ValueError(f"kind must be one of {sorted(_GATES)}, got {kind!r}")
        self.kind = kind
        self.input_size = input_size
        self.hidden_size = hidden_size
        gates = _GATES[kind] * hidden_size
        self.weight_ih_l0 = nn.Parameter(torch.empty(gates, input_size))
        self.weight_hh_l0 = nn.Parameter(torch.empty(gates, hidden_size))
        self.bias_ih_l0 = nn.Parameter(torch.empty(gates))
        self.bias_hh_l0 = nn.Parameter(torch.empty(gates))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Same as ``nn.RNNBase``: U(-1/sqrt(H), 1/sqrt(H)), in the same order, so a
        given seed yields the same weights as the torch layer."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``x`` [B, T, input_size] to the output sequence [B, T, hidden_size]."""
        weights = [self.weight_ih_l0, self.weight_hh_l0, self.bias_ih_l0, self.bias_hh_l0]
        return _fused_sequence(self.kind, x, weights, self.training)

    def extra_repr(self) -> str:
        return f"{self.kind}, {self.input_size}, {self.hidden_size}"


@register_grad_sampler(RecurrentCore)
def compute_recurrent_core_grad_sample(
    layer: RecurrentCore, activations: List[Tensor], backprops: Tensor
) -> Dict[nn.Parameter, Tensor]:
    """Exact per-sample gradients of a :class:`RecurrentCore` (see module docstring).

    Args:
        layer: the core.
        activations: ``[x]``, the input [B, T, D] captured in forward.
        backprops: gradient of the loss w.r.t. the output sequence [B, T, H]
            (already scaled by Opacus for the loss reduction).
    """
    x = activations[0].to(backprops.dtype)
    w_ih, w_hh = layer.weight_ih_l0.detach(), layer.weight_hh_l0.detach()
    b_ih, b_hh = layer.bias_ih_l0.detach(), layer.bias_hh_l0.detach()
    gates = w_ih.shape[0]

    with torch.enable_grad():
        a = F.linear(x, w_ih, b_ih).requires_grad_()
        eye = torch.eye(gates, dtype=a.dtype, device=a.device)
        h = _fused_sequence(layer.kind, a, [eye, w_hh, torch.zeros_like(b_ih), b_hh], True)
        (d_a,) = torch.autograd.grad(h, a, backprops)

    h_prev = F.pad(h.detach(), (0, 0, 1, 0))[:, :-1]  # h_{t-1}, with h_{-1} = 0
    d_gh = d_a
    if layer.kind == "gru":
        n = layer.hidden_size
        reset = torch.sigmoid(a.detach()[..., :n] + F.linear(h_prev, w_hh[:n], b_hh[:n]))
        d_gh = torch.cat([d_a[..., : 2 * n], d_a[..., 2 * n :] * reset], dim=-1)

    grads = {
        layer.weight_ih_l0: torch.einsum("btg,btd->bgd", d_a, x),
        layer.bias_ih_l0: d_a.sum(1),
        layer.weight_hh_l0: torch.einsum("btg,bth->bgh", d_gh, h_prev),
        layer.bias_hh_l0: d_gh.sum(1),
    }
    return {p: g for p, g in grads.items() if p.requires_grad}
