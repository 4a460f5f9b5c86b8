"""Distillation losses: values by hand and the hidden-state matching rule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model.modeling import DynaBertOutput
from training.losses import DistillLoss, HiddenMSE, LogitMSE, QASoftCrossEntropy, SoftCrossEntropy, label_loss


def test_soft_cross_entropy_by_hand():
    s = torch.tensor([[0.0, math.log(3.0)]])  # softmax (1/4, 3/4)
    t = torch.tensor([[0.0, 0.0]])  # uniform target
    expected = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75))
    assert SoftCrossEntropy()(s, t).item() == pytest.approx(expected, rel=1e-6)
    # a one-hot teacher makes it the ordinary cross-entropy
    hard = torch.tensor([[-1e4, 1e4]])
    assert SoftCrossEntropy()(s, hard).item() == pytest.approx(
        F.cross_entropy(s, torch.tensor([1])).item(), rel=1e-5
    )


def test_soft_cross_entropy_gradient_vanishes_at_the_teacher():
    t = torch.randn(4, 3)
    s = t.clone().requires_grad_(True)
    SoftCrossEntropy()(s, t).backward()
    assert s.grad.abs().max().item() < 1e-6


def test_soft_cross_entropy_at_a_temperature_by_hand():
    s = torch.tensor([[0.0, 2 * math.log(3.0)]])  # at T = 2: softmax (1/4, 3/4)
    t = torch.tensor([[0.0, 0.0]])
    expected = -(0.5 * math.log(0.25) + 0.5 * math.log(0.75)) * 4  # scaled by T^2
    assert SoftCrossEntropy(2.0)(s, t).item() == pytest.approx(expected, rel=1e-6)
    # the T^2 factor keeps the gradient's size: for large T it tends to (s - t) / (n_classes * batch)
    s = torch.tensor([[0.3, -0.2, 0.1]], requires_grad=True)
    t = torch.tensor([[0.0, 0.5, -0.5]])
    SoftCrossEntropy(100.0)(s, t).backward()
    centred = (s - t) - (s - t).mean()
    assert torch.allclose(s.grad, centred.detach() / 3, atol=1e-3)


def test_distill_loss_temperature_reaches_the_logit_loss():
    student = DynaBertOutput(torch.tensor([[0.0, 2 * math.log(3.0)]]))
    teacher = DynaBertOutput(torch.tensor([[0.0, 0.0]]))
    total, logit, _ = DistillLoss("classification", 1.0, 0.0, temperature=2.0)(student, teacher)
    assert logit.item() == pytest.approx(SoftCrossEntropy(2.0)(student.logits, teacher.logits).item())
    assert total.item() != pytest.approx(DistillLoss("classification", 1.0, 0.0)(student, teacher)[0].item())
    with pytest.raises(ValueError, match="temperature"):
        DistillLoss("classification", temperature=0.0)


def test_qa_sce_averages_start_and_end():
    s, t = torch.randn(2, 5, 2), torch.randn(2, 5, 2)
    sce = SoftCrossEntropy()
    expected = (sce(s[..., 0], t[..., 0]) + sce(s[..., 1], t[..., 1])) / 2
    assert QASoftCrossEntropy()(s, t).item() == pytest.approx(expected.item(), rel=1e-6)


def test_logit_mse():
    assert LogitMSE()(torch.tensor([[1.0], [3.0]]), torch.tensor([[0.0], [1.0]])).item() == pytest.approx(2.5)


def test_hidden_mse_follows_teacher_layers():
    # teacher: embeddings + 4 layers, each hidden state constant = its index
    teacher_h = tuple(torch.full((1, 2, 3), float(i)) for i in range(5))
    teacher = DynaBertOutput(torch.zeros(1, 2), teacher_h, (0, 1, 2, 3))
    # student keeps 2 layers matched to teacher layers 1 and 3 (hidden_states[2], [4])
    student_h = (torch.zeros(1, 2, 3), torch.full((1, 2, 3), 2.0), torch.full((1, 2, 3), 5.0))
    student = DynaBertOutput(torch.zeros(1, 2), student_h, (1, 3))
    # embeddings 0 vs 0, layer 2.0 vs 2.0, layer 5.0 vs 4.0 -> 0 + 0 + 1
    assert HiddenMSE()(student, teacher).item() == pytest.approx(1.0)
    total, logit, hidden = DistillLoss("classification", l1=1.0, l2=0.1)(student, teacher)
    assert hidden.item() == pytest.approx(1.0)
    assert total.item() == pytest.approx(logit.item() + 0.1)


def test_hidden_mse_needs_hidden_states():
    out = DynaBertOutput(torch.zeros(1, 2))
    with pytest.raises(ValueError, match="output_hidden_states"):
        HiddenMSE()(out, out)


def test_label_loss_per_task_type():
    logits = torch.tensor([[2.0, 0.0]])
    assert label_loss(logits, torch.tensor([0]), "classification").item() == pytest.approx(
        -math.log(math.exp(2) / (math.exp(2) + 1)), rel=1e-6
    )
    assert label_loss(torch.tensor([[1.5]]), torch.tensor([0.5]), "regression").item() == pytest.approx(1.0)
    qa = torch.zeros(1, 4, 2)  # uniform over 4 positions
    assert label_loss(qa, torch.tensor([[1, 2]]), "qa").item() == pytest.approx(math.log(4))
