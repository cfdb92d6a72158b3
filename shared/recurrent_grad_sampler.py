"""Opacus' per-sample gradient rule for ``RecurrentCore`` (the maths: ``shared/recurrent.py``).

Registering it needs Opacus, which costs seconds to import; it lives here so that code that
only runs the model (evaluation, prediction) does not import Opacus. Import this module before
making a model private (``client/private_training.py`` does).
"""

from typing import Dict, List

import torch
import torch.nn.functional as F
from opacus.grad_sample import register_grad_sampler
from torch import Tensor, nn

from shared.recurrent import _CELLS, RecurrentCore


@register_grad_sampler(RecurrentCore)
@torch.no_grad()
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
    weights = [layer.weight_ih_l0, layer.weight_hh_l0, layer.bias_ih_l0, layer.bias_hh_l0]
    w_ih, w_hh, b_ih, b_hh = (w.detach() for w in weights)
    local, step, _ = _CELLS[layer.kind]

    h = layer.outputs(x)  # under no_grad: no graph
    h_prev = F.pad(h, (0, 0, 1, 0))[:, :-1]  # h_{t-1}, with h_{-1} = 0
    local_grads = local(F.linear(x, w_ih, b_ih), F.linear(h_prev, w_hh, b_hh), h, h_prev)

    d_a, d_gh = [], []
    dh_back = dc_back = backprops.new_zeros(backprops.shape[0], backprops.shape[2])
    for t in reversed(range(x.shape[1])):
        d_a_t, d_gh_t, dh_skip, dc_back = step(
            backprops[:, t] + dh_back, dc_back, *(g[:, t] for g in local_grads)
        )
        dh_back = d_gh_t @ w_hh + dh_skip
        d_a.append(d_a_t)
        d_gh.append(d_gh_t)
    d_a, d_gh = torch.stack(d_a[::-1], dim=1), torch.stack(d_gh[::-1], dim=1)

    grads = {
        layer.weight_ih_l0: torch.einsum("btg,btd->bgd", d_a, x),
        layer.bias_ih_l0: d_a.sum(1),
        layer.weight_hh_l0: torch.einsum("btg,bth->bgh", d_gh, h_prev),
        layer.bias_hh_l0: d_gh.sum(1),
    }
    return {p: g for p, g in grads.items() if p.requires_grad}
