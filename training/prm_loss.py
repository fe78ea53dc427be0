"""The PRM loss and step-score reads, pure functions on tensors.

A PRM is trained as token classification at the step ends only (TRL PRMTrainer's recipe): the per-step
cross-entropy of Math-Shepherd (Wang et al., 2024) / Lightman et al. (2023),

    L = -1/S * sum_{s in labelled steps} [ y_s log p_s + (1 - y_s) log(1 - p_s) ],   p_s = softmax(z_s)[good]

where z_s are the (bad, good) logits at step s's end token; with two labels p_s = sigmoid(z_s[good] - z_s[bad]), so
the served raw step score (rewardmodel.steps.step_scores) is exactly the log-odds this loss trains. Positions whose
label is -100 (every token that is not a trained step end) contribute nothing, to the loss or to its gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rewardmodel.steps import PRMSpec, step_scores
from training.prm_batch import IGNORE


def prm_loss(logits: torch.Tensor, labels: torch.Tensor, spec: PRMSpec = PRMSpec()) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean cross-entropy over the labelled positions, and step metrics.

    logits: (B, T, C) token-classification logits (C = spec.num_labels); labels: (B, T) long, 1 good / 0 bad at
    trained step ends, -100 elsewhere. With one label the logit is read as the log-odds of a good step.
    """
    mask = labels != IGNORE  # (B, T)
    picked = logits[mask].float()  # (S, C)
    target = labels[mask]  # (S,)
    if target.numel() == 0:  # no labelled step in this micro-batch: a zero loss that still reaches the graph
        zero = logits.sum() * 0.0
        return zero, {"step_accuracy": zero.detach(), "good_fraction": zero.detach()}
    if spec.num_labels == 1:
        loss = F.binary_cross_entropy_with_logits(picked[:, 0], target.float())
    else:
        classes = target if spec.good_label == 1 else 1 - target  # label 1 = good -> the head's good index
        loss = F.cross_entropy(picked, classes)
    scores = step_scores(picked.detach(), spec)  # (S,) raw step scores
    good = target.bool()
    metrics = {"step_accuracy": ((scores > 0) == good).float().mean(), "good_fraction": good.float().mean()}
    return loss, metrics


def batch_step_scores(logits: torch.Tensor, step_mask: torch.Tensor, spec: PRMSpec) -> list[torch.Tensor]:
    """Per row, the raw scores (n_steps,) at its step ends, in step order. logits (B, T, C), step_mask (B, T)."""
    return [step_scores(logits[row][step_mask[row]].float(), spec) for row in range(logits.shape[0])]
