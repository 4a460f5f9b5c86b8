"""Network rewiring by first-order Taylor importance (Hou et al. 2020, section 3.1; the head score
follows Michel et al., "Are Sixteen Heads Really Better than One?", NeurIPS 2019).

* head h of layer l: |dL/d m_{l,h}| where m is a multiplicative mask on the head's output, passed
  through the model's ``head_mask`` argument (L, nh) and held at 1;
* FFN neuron j of layer l: |sum over its input weights (and bias) of w * dL/dw| +
  |sum over its output weights of w * dL/dw|.

Scores are accumulated over batches of the dev set, with the labels' loss, then ``model.rewire``
puts the most important heads and neurons first. Rewiring is a permutation, so the full
network's function does not change.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import Tensor

from model.modeling import DynaBertModel
from training.losses import label_loss

log = logging.getLogger(__name__)


def compute_importance(
    model: DynaBertModel, batches: Iterable[dict[str, Tensor]], device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """Head importance (L, nh) and neuron importance (L, d_ff) of the full network."""
    cfg = model.cfg
    was_training = model.training
    model.eval()  # no dropout: score the function that is kept
    head_mask = torch.ones(cfg.num_layers, cfg.num_heads, device=device, requires_grad=True)
    heads = torch.zeros(cfg.num_layers, cfg.num_heads)
    neurons = torch.zeros(cfg.num_layers, cfg.ffn_size)
    n = 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        model.zero_grad(set_to_none=True)
        head_mask.grad = None
        out = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], head_mask=head_mask)
        label_loss(out.logits, batch["labels"], cfg.task.type).backward()
        heads += head_mask.grad.detach().abs().cpu()
        with torch.no_grad():
            for i, lyr in enumerate(model.layers):
                w_in = (lyr.ffn_in_weight * lyr.ffn_in_weight.grad).sum(
                    1
                ) + lyr.ffn_in_bias * lyr.ffn_in_bias.grad
                w_out = (lyr.ffn_out_weight_t * lyr.ffn_out_weight_t.grad).sum(1)  # (d_ff in, H out)
                neurons[i] += (w_in.abs() + w_out.abs()).cpu()
        n += 1
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    if n == 0:
        raise ValueError("importance needs at least one batch of examples")
    log.info("importance computed on %d batches", n)
    return heads / n, neurons / n


def rewire_by_importance(
    model: DynaBertModel, batches: Iterable[dict[str, Tensor]], device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """Score heads and neurons, then rewire ``model`` in place; returns the scores."""
    heads, neurons = compute_importance(model, batches, device)
    model.rewire(heads, neurons)
    return heads, neurons
