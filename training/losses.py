"""Distillation losses of DynaBERT (Hou et al., NeurIPS 2020, eqs. 1-3), as small modules.

* :class:`SoftCrossEntropy`: -sum softmax(teacher) * log_softmax(student), the logit loss for
  classification and for QA start/end positions;
* :class:`LogitMSE`: the logit loss for regression (STS-B);
* :class:`HiddenMSE`: MSE between the embedding outputs plus each kept student layer and the
  teacher layer it is matched to (``DynaBertOutput.teacher_layers``);
* :class:`DistillLoss`: l1 * logit loss + l2 * hidden loss (the logit loss optionally at a
  temperature, the recipe's ``temperature``; 1 in the paper).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from model.modeling import DynaBertOutput


class SoftCrossEntropy(nn.Module):
    """Cross-entropy against the teacher's soft distribution over the last dimension, averaged
    over all other positions (batch, and tokens for QA). With a temperature T > 1 both
    distributions are softened and the loss is scaled by T^2, so its gradients keep their size
    (Hinton et al., "Distilling the Knowledge in a Neural Network", 2015)."""

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        self.temperature = temperature

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        t = self.temperature
        target = F.softmax(teacher_logits / t, dim=-1)
        return -(target * F.log_softmax(student_logits / t, dim=-1)).sum(-1).mean() * (t * t)


class QASoftCrossEntropy(nn.Module):
    """SCE over token positions, for start and end logits (B, T, 2) separately, then averaged."""

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.sce = SoftCrossEntropy(temperature)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        s, t = student_logits.transpose(1, 2), teacher_logits.transpose(1, 2)  # (B, 2, T)
        return self.sce(s, t)


class LogitMSE(nn.Module):
    """Mean squared error between student and teacher outputs (regression)."""

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        return F.mse_loss(student_logits, teacher_logits)


class HiddenMSE(nn.Module):
    """MSE(embeddings) + sum over kept layers k of MSE(student h_k, teacher h_{teacher_layers[k]}).

    Both outputs must carry hidden states (``output_hidden_states=True``); the teacher runs at full
    depth, so its hidden_states[j + 1] is the output of its layer j. Padding positions are included,
    as in the paper's code; they are few with length-bucketed batches."""

    def forward(self, student: DynaBertOutput, teacher: DynaBertOutput) -> Tensor:
        if student.hidden_states is None or teacher.hidden_states is None or student.teacher_layers is None:
            raise ValueError("HiddenMSE needs outputs computed with output_hidden_states=True")
        loss = F.mse_loss(student.hidden_states[0], teacher.hidden_states[0])
        for k, j in enumerate(student.teacher_layers):
            loss = loss + F.mse_loss(student.hidden_states[k + 1], teacher.hidden_states[j + 1])
        return loss


class DistillLoss(nn.Module):
    """l1 * logit loss + l2 * hidden-state loss; returns (total, logit part, hidden part)."""

    def __init__(self, task_type: str, l1: float = 1.0, l2: float = 0.1, temperature: float = 1.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"the distillation temperature must be > 0, got {temperature}")
        self.logit_loss: nn.Module = {  # regression matches values: a temperature has no meaning there
            "classification": SoftCrossEntropy(temperature),
            "regression": LogitMSE(),
            "qa": QASoftCrossEntropy(temperature),
        }[task_type]
        self.hidden_loss = HiddenMSE()
        self.l1, self.l2 = l1, l2

    def forward(self, student: DynaBertOutput, teacher: DynaBertOutput) -> tuple[Tensor, Tensor, Tensor]:
        logit = self.logit_loss(student.logits, teacher.logits)
        hidden = self.hidden_loss(student, teacher) if self.l2 else logit.new_zeros(())
        return self.l1 * logit + self.l2 * hidden, logit.detach(), hidden.detach()


def label_loss(logits: Tensor, labels: Tensor, task_type: str) -> Tensor:
    """The supervised loss: cross-entropy, MSE for regression, start/end CE for QA
    (``labels`` (B, 2) holding start and end token positions)."""
    if task_type == "classification":
        return F.cross_entropy(logits, labels)
    if task_type == "regression":
        return F.mse_loss(logits.squeeze(-1), labels.float())
    start, end = logits.unbind(-1)  # each (B, T)
    return (F.cross_entropy(start, labels[:, 0]) + F.cross_entropy(end, labels[:, 1])) / 2
