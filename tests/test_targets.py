"""The explained class's score, probability and gradient, checked by hand."""
import torch

from methods.targets import target_gradients, target_log_probabilities, target_probabilities, target_scores


def test_scores_and_probabilities_by_hand():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    targets = torch.tensor([2, 0])
    assert target_scores(logits, targets).tolist() == [3.0, 0.0]
    expected = torch.tensor([torch.e ** 3 / (torch.e + torch.e ** 2 + torch.e ** 3), 1 / 3])
    assert torch.allclose(target_probabilities(logits, targets), expected)
    assert torch.allclose(target_log_probabilities(logits, targets), expected.log())
    sigmoid = torch.tensor([1 / (1 + torch.e ** -3), 0.5])
    assert torch.allclose(target_probabilities(logits, targets, multilabel=True), sigmoid)
    assert torch.allclose(target_log_probabilities(logits, targets, multilabel=True), sigmoid.log())


def test_gradients_are_per_sample():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    weight = torch.tensor([[1.0, 0.0], [2.0, 5.0], [0.0, 7.0]])  # logits = x W^T, 3 classes
    logits = x @ weight.T
    (grad,) = target_gradients(logits, torch.tensor([1, 2]), x)
    assert grad.tolist() == [[2.0, 5.0], [0.0, 7.0]]  # row k of W for each sample
