"""The task losses (`model.task_loss`, `training/task_losses/`): the NLL, and DFT's and EAFT's
weightings of it, against float64 by hand, and what a step logs and trains on for each."""

import math

import pytest
import torch

from cfs_lightning.tokens import IGNORE_INDEX
from cfs_lightning.training import CausalLMFineTuner
from cfs_lightning.training.losses import mean_token_loss, nll
from cfs_lightning.training.task_losses import DFT, EAFT, NLL, TASK_LOSS_KEY, TaskLoss, task_terms
from cfs_lightning.training.task_losses.dft import dft
from cfs_lightning.training.task_losses.eaft import topk_entropy_weight

V = 7


def _case(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(3, 6, V, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    labels = torch.randint(0, V, (3, 6), generator=g)
    labels[0, 3:] = IGNORE_INDEX  # padding after a short response
    labels[2, :3] = IGNORE_INDEX  # a prompt that takes no loss
    return logits, labels


def _by_hand(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, torch.Tensor]:
    """Mean NLL, mean p * NLL and the gradient of the DFT loss with p held constant."""
    nlls, weighted, grad = [], [], torch.zeros_like(logits)
    for b in range(labels.size(0)):
        for t in range(labels.size(1) - 1):  # position t predicts labels[t + 1]
            y = int(labels[b, t + 1])
            if y == IGNORE_INDEX:
                continue
            p = logits[b, t].detach().softmax(-1)
            nlls.append(-math.log(p[y]))
            weighted.append(-p[y].item() * math.log(p[y]))
            onehot = torch.zeros(V, dtype=torch.float64)
            onehot[y] = 1.0
            grad[b, t] = p[y] * (p - onehot)  # sg(p_y) * d(-log p_y)/d logits
    n = len(nlls)
    return sum(nlls) / n, sum(weighted) / n, grad / n


def test_dft_weights_each_token_nll_by_its_detached_probability():
    logits, labels = _case()
    loss = DFT()(logits, labels)
    torch.testing.assert_close(loss, mean_token_loss(logits, labels, per_token=dft))
    (grad,) = torch.autograd.grad(loss, logits)
    mean_nll, mean_dft, hand_grad = _by_hand(logits, labels)
    assert mean_token_loss(logits, labels).item() == pytest.approx(mean_nll, rel=1e-12)
    assert loss.item() == pytest.approx(mean_dft, rel=1e-12)
    torch.testing.assert_close(grad, hand_grad, rtol=1e-10, atol=1e-12)
    # had the weight not been detached, the gradient would be that of -p log p, which differs
    (undetached,) = torch.autograd.grad(
        mean_token_loss(logits, labels, per_token=lambda z, y: nll(z, y) * torch.exp(-nll(z, y))), logits)
    assert not torch.allclose(grad, undetached)


def _eaft_by_hand(logits: torch.Tensor, labels: torch.Tensor, k: int, alpha: float) -> tuple[float, torch.Tensor]:
    """Mean w * NLL and its gradient with w held constant, w = (H of the top-k softmax / log k) ** alpha."""
    values, grad = [], torch.zeros_like(logits)
    for b in range(labels.size(0)):
        for t in range(labels.size(1) - 1):
            y = int(labels[b, t + 1])
            if y == IGNORE_INDEX:
                continue
            z = logits[b, t].detach()
            top = sorted(z.tolist(), reverse=True)[:k]
            norm = math.log(sum(math.exp(v) for v in top))
            entropy = -sum(math.exp(v - norm) * (v - norm) for v in top)
            w = (entropy / math.log(k)) ** alpha
            p = z.softmax(-1)
            values.append(-w * math.log(p[y]))
            onehot = torch.zeros(V, dtype=torch.float64)
            onehot[y] = 1.0
            grad[b, t] = w * (p - onehot)
    return sum(values) / len(values), grad / len(values)


@pytest.mark.parametrize("k, alpha", [(3, 1.0), (5, 0.5), (V, 2.0)])
def test_eaft_weights_each_token_nll_by_its_detached_normalised_topk_entropy(k, alpha):
    logits, labels = _case(1)
    loss = EAFT(alpha=alpha, k=k)(logits, labels)
    (grad,) = torch.autograd.grad(loss, logits)
    value, hand_grad = _eaft_by_hand(logits, labels, k, alpha)
    assert loss.item() == pytest.approx(value, rel=1e-12)
    torch.testing.assert_close(grad, hand_grad, rtol=1e-10, atol=1e-12)
    assert loss.item() < mean_token_loss(logits, labels).item()  # every weight is below 1 here


def test_eaft_weight_is_one_where_the_top_k_are_tied_and_near_zero_where_one_token_dominates():
    rows = torch.tensor([[0.0] * V, [30.0] + [0.0] * (V - 1), [2.0, 2.0, 2.0, -50.0, -50.0, -50.0, -50.0]],
                        dtype=torch.float64)
    torch.testing.assert_close(topk_entropy_weight(rows, k=4), torch.tensor([1.0, 0.0, 0.7925], dtype=torch.float64),
                               atol=1e-4, rtol=0)  # the third: log 3 / log 4
    assert topk_entropy_weight(rows, k=50).tolist() == topk_entropy_weight(rows, k=V).tolist()  # k > V: all V
    torch.testing.assert_close(topk_entropy_weight(rows, k=4, alpha=0.0), torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="EAFT.k must be >= 2"):
        EAFT(k=1)
    with pytest.raises(ValueError, match="EAFT.alpha must be >= 0, got -1"):
        EAFT(alpha=-1)


def test_dft_and_nll_refuse_a_batch_without_targets():
    logits, labels = _case()
    for per_token in (nll, dft):
        with pytest.raises(ValueError, match="no target token"):
            mean_token_loss(logits, torch.full_like(labels, IGNORE_INDEX), per_token=per_token)


def test_each_task_loss_logs_the_plain_nll_and_trains_on_its_own_value():
    logits, labels = _case()
    mean_nll, mean_dft, _ = _by_hand(logits, labels)
    logs, loss = task_terms(NLL(), logits, labels, "token")  # the NLL is computed once and trained on
    assert logs.keys() == {TASK_LOSS_KEY} and loss is logs[TASK_LOSS_KEY] and loss.requires_grad
    assert loss.item() == pytest.approx(mean_nll, rel=1e-12)
    logs, loss = task_terms(DFT(), logits, labels, "token")
    assert logs.keys() == {TASK_LOSS_KEY, "train/task_dft"} and loss is logs["train/task_dft"]
    assert not logs[TASK_LOSS_KEY].requires_grad and loss.requires_grad  # the NLL is only logged
    assert (logs[TASK_LOSS_KEY].item(), loss.item()) == pytest.approx((mean_nll, mean_dft), rel=1e-12)
    logs, loss = task_terms(None, logits, labels, "token")  # no task loss (SDFT): the NLL still logged
    assert loss is None and not logs[TASK_LOSS_KEY].requires_grad


def test_a_task_loss_that_is_not_one_is_refused_with_the_choices(tiny_model_dir):
    with pytest.raises(ValueError, match=r"model.task_loss must be a TaskLoss \(class_path: "
                                         r"cfs_lightning.training.task_losses.NLL, DFT, ...\) or null, got 'dft'"):
        CausalLMFineTuner(str(tiny_model_dir), task_loss="dft")
    with pytest.raises(ValueError, match="sets no `name`"):
        TaskLoss().key
