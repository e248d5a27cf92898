"""Parity of every regularizer with plain float64 maths on random inputs."""

import math
import re

import pytest
import torch
from torch import nn

from cfs_lightning.tokens import IGNORE_INDEX
from cfs_lightning.training.losses import token_divergence
from cfs_lightning.training.regularizers import EMA, KLFromCachedTopK, KLToReference, L2ToInit, topk_forward_kl

V = 7


def _dists(seed=0, shape=(3, 5)):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, V, generator=g, dtype=torch.float64) * 2,
            torch.randn(*shape, V, generator=g, dtype=torch.float64) * 2)


def _kl(p, q):
    return sum(p[v] * math.log(p[v] / q[v]) for v in range(len(p)))


def _by_hand(logits, ref_logits, fn, temperature=1.0):
    q_all = (logits / temperature).softmax(-1).reshape(-1, V).tolist()
    p_all = (ref_logits / temperature).softmax(-1).reshape(-1, V).tolist()
    return torch.tensor([fn(p, q) for p, q in zip(p_all, q_all)], dtype=torch.float64).reshape(logits.shape[:-1])


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_forward_reverse_and_jsd_match_their_definitions(temperature):
    logits, ref = _dists()
    forward = token_divergence(logits, ref, "forward", temperature=temperature)
    reverse = token_divergence(logits, ref, "reverse", temperature=temperature)
    assert forward.dtype == torch.float64
    torch.testing.assert_close(forward, _by_hand(logits, ref, _kl, temperature), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(reverse, _by_hand(logits, ref, lambda p, q: _kl(q, p), temperature),
                               rtol=1e-12, atol=1e-12)
    assert not torch.allclose(forward, reverse)
    for beta in (0.1, 0.5, 0.9):
        def jsd(p, q, b=beta):  # TRL GKD convention: M = b p_ref + (1 - b) p_theta
            m = [b * pv + (1 - b) * qv for pv, qv in zip(p, q)]
            return b * _kl(p, m) + (1 - b) * _kl(q, m)
        got = token_divergence(logits, ref, beta=beta, temperature=temperature)
        torch.testing.assert_close(got, _by_hand(logits, ref, jsd, temperature), rtol=1e-12, atol=1e-12)
    # endpoints are the KLs themselves; 0.5 is the symmetric JSD
    torch.testing.assert_close(token_divergence(logits, ref, beta=0.0, temperature=temperature), forward)
    torch.testing.assert_close(token_divergence(logits, ref, beta=1.0, temperature=temperature), reverse)
    torch.testing.assert_close(token_divergence(logits, ref, beta=0.5), token_divergence(ref, logits, beta=0.5))


def test_the_generalised_jsd_jumps_at_both_ends_as_its_option_says():
    """TRL's convention, kept: JSD_beta is at most the binary entropy of beta, so it vanishes as
    beta nears 0 or 1, where the value jumps to a KL; the `beta` option documents this."""
    from cfs_lightning.training.regularizers import SelfDistillation

    logits, ref = _dists()
    ends = {0.0: token_divergence(logits, ref, "forward"), 1.0: token_divergence(logits, ref, "reverse")}
    for beta, end in ((1e-6, 0.0), (1 - 1e-6, 1.0)):
        near = token_divergence(logits, ref, beta=beta)
        entropy = -(beta * math.log(beta) + (1 - beta) * math.log(1 - beta))
        assert (near <= entropy + 1e-15).all() and (ends[end] > 1000 * near).all()
        torch.testing.assert_close(token_divergence(logits, ref, beta=end), ends[end])
    for cls in (KLToReference, SelfDistillation):
        assert re.search(r"jumps at both\s+ends", cls.__init__.__doc__)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fused_forward_kl_gradient_matches_autograd_of_the_definition(temperature):
    logits, ref = _dists()
    logits.requires_grad_(True)
    weights = torch.rand(logits.shape[:-1], dtype=torch.float64)
    fused = token_divergence(logits, ref, temperature=temperature)
    (grad,) = torch.autograd.grad((fused * weights).sum(), logits)
    logq, logp = (logits / temperature).log_softmax(-1), (ref / temperature).log_softmax(-1)
    plain = (logp.exp() * (logp - logq)).sum(-1)
    (expected,) = torch.autograd.grad((plain * weights).sum(), logits)
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: token_divergence(x, ref[:1, :2], temperature=temperature),
                                    (logits.detach()[:1, :2].clone().requires_grad_(True),))


@pytest.mark.parametrize("kw", [{"direction": "forward"}, {"direction": "reverse"}, {"beta": 0.3}])
def test_divergence_is_nonnegative_and_zero_for_identical_models(kw):
    logits, ref = _dists(1)
    assert (token_divergence(logits, ref, **kw) > 0).all()
    assert token_divergence(ref, ref, **kw).abs().max() < 1e-12


class LinearReference:
    """A reference whose head is a fixed linear map, like `FrozenReference` over hidden states."""

    def __init__(self, head):
        self.head = head

    def logits(self, hidden):
        return hidden @ self.head


def _labels(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, shape, generator=g)
    labels[0, 4:] = IGNORE_INDEX  # padding
    labels[1, :2] = IGNORE_INDEX  # a prompt
    return labels


@pytest.mark.parametrize("kw", [{}, {"direction": "reverse"}, {"beta": 0.5}, {"temperature": 0.7}])
def test_kl_to_reference_masks_and_chunks_exactly(kw):
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(3, 9, 4, generator=g, dtype=torch.float64)
    head = torch.randn(4, V, generator=g, dtype=torch.float64)
    logits = torch.randn(3, 9, V, generator=g, dtype=torch.float64, requires_grad=True)
    labels = _labels((3, 9))
    results = []
    for chunk in (None, 1, 3, 100):
        reg = KLToReference(chunk_size=chunk, **kw)
        reg.reference = LinearReference(head)
        value = reg.divergence(logits, hidden, labels)
        (grad,) = torch.autograd.grad(value, logits)
        results.append((value, grad))
    per_token = token_divergence(logits.detach()[:, :-1], (hidden @ head)[:, :-1], **kw)
    valid = labels[:, 1:] != IGNORE_INDEX
    expected = per_token[valid].sum() / valid.sum()
    for value, grad in results:
        torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, results[0][1], rtol=1e-12, atol=1e-12)
    assert results[0][1][0, 4:].abs().max() == 0  # no gradient from masked positions


def test_kl_to_reference_validates_its_options():
    with pytest.raises(ValueError, match="either beta"):
        KLToReference(beta=0.5, direction="reverse")
    with pytest.raises(ValueError, match="beta"):
        KLToReference(beta=1.5)
    with pytest.raises(ValueError, match="on"):
        KLToReference(on="prompt")


def _coarse_by_hand(logits, ids, ref_logits):
    q = logits.softmax(-1).tolist()
    p = ref_logits.softmax(-1).tolist()
    s = ids.tolist()
    head = sum(p[v] * math.log(p[v] / q[v]) for v in s)
    p_tail, q_tail = 1 - sum(p[v] for v in s), 1 - sum(q[v] for v in s)
    return head + p_tail * math.log(p_tail / q_tail)


@pytest.mark.parametrize("k", [1, 3, V - 1])
def test_topk_kl_is_the_coarsened_kl_and_a_lower_bound(k):
    logits, ref = _dists(4, shape=(6,))
    top = ref.log_softmax(-1).topk(k)
    got = topk_forward_kl(logits, top.indices, top.values)
    expected = torch.tensor([_coarse_by_hand(logits[i], top.indices[i], ref[i]) for i in range(6)],
                            dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    exact = token_divergence(logits, ref)
    assert (got <= exact + 1e-12).all() and (got >= -1e-12).all()


def test_topk_kl_is_exact_when_the_reference_has_no_tail():
    logits, ref = _dists(5, shape=(4,))
    ref[:, 3:] = -1e4  # the reference puts no mass outside tokens 0-2
    top = ref.log_softmax(-1).topk(3)
    torch.testing.assert_close(topk_forward_kl(logits, top.indices, top.values), token_divergence(logits, ref),
                               rtol=1e-10, atol=1e-12)


def test_kl_from_cached_topk_reads_the_replay_batch():
    logits, ref = _dists(6, shape=(3, 9))
    labels = _labels((3, 9))
    top = ref.log_softmax(-1).topk(4)
    batch = {"replay": {"labels": labels, "topk_ids": top.indices, "topk_logprobs": top.values}}
    valid = labels[:, 1:] != IGNORE_INDEX
    per_token = topk_forward_kl(logits[:, :-1], top.indices[:, :-1], top.values[:, :-1])
    for reg in (KLFromCachedTopK(chunk_size=2), KLFromCachedTopK(chunk_size=None)):
        torch.testing.assert_close(reg(batch, {"replay": logits}), per_token[valid].sum() / valid.sum())
    fewer = KLFromCachedTopK(k=2)(batch, {"replay": logits})
    per_token2 = topk_forward_kl(logits[:, :-1], top.indices[:, :-1, :2], top.values[:, :-1, :2])
    torch.testing.assert_close(fewer, per_token2[valid].sum() / valid.sum())
    with pytest.raises(KeyError, match="store_topk"):
        KLFromCachedTopK()({"replay": {"labels": labels}}, {"replay": logits})


class Holder(nn.Module):
    """Stands in for the LightningModule: regularizers read `module.model`."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).double()
        self.model[1].bias.requires_grad_(False)  # frozen: not regularized


@pytest.mark.parametrize("offload", [False, True])  # fused (foreach) and per-parameter paths
def test_l2_to_init_is_the_squared_distance_over_trainable_weights(offload):
    module = Holder()
    reg = L2ToInit(offload=offload)
    reg.setup(module)
    initial = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    assert reg({}, {}).item() == 0
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(torch.randn_like(p))
    term = reg({}, {})
    expected = sum(((p.detach() - initial[n]) ** 2).sum() for n, p in module.model.named_parameters()
                   if p.requires_grad)
    assert term.item() == pytest.approx(expected.item(), rel=1e-12)
    (3 * term).backward()
    for name, p in module.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, 6 * (p.detach() - initial[name]))
        else:
            assert p.grad is None


def test_ema_follows_the_recurrence_and_swaps_exactly():
    module = Holder()
    ema = EMA(decay=0.9, update_every=2, final="ema")
    ema.setup(module)
    w = module.model[0].weight
    expected = w.detach().clone()
    for step in range(1, 7):
        with torch.no_grad():
            w.add_(torch.randn_like(w))
        ema.on_after_optimizer_step(module)
        if step % 2 == 0:
            expected = 0.9 * expected + 0.1 * w.detach()
    assert ema.num_updates == 3
    live = w.detach().clone()
    with ema.eval_weights(module):
        torch.testing.assert_close(w.detach(), expected)
    assert torch.equal(w.detach(), live)  # the live weights come back bit for bit
    saved = ema.state_dict()
    other = EMA(decay=0.9, update_every=2)
    other.setup(Holder())
    other.load_state_dict(saved)
    torch.testing.assert_close(other.average[0].double(), expected)
    ema.on_train_end(module)
    torch.testing.assert_close(w.detach(), expected)
    keep = EMA(final="live")
    keep.setup(module)
    before = w.detach().clone()
    with torch.no_grad():
        w.add_(1.0)
    keep.on_after_optimizer_step(module)
    keep.on_train_end(module)
    assert torch.equal(w.detach(), before + 1.0)


@pytest.mark.parametrize("update_after, update_every", [(0, 1), (2, 1), (1, 2)])
def test_bema_follows_trls_recurrence_in_float64(update_after, update_every):
    """TRL's BEMACallback by hand: at step tau theta_0 and the average restart from the live
    weights; at every phi-th step s after it, beta = max((rho + gamma s) ** -kappa, floor),
    ema = (1 - beta) ema + beta theta, and the weights used are ema + (rho + gamma s) ** -eta (theta - theta_0)."""
    kappa, eta, rho, gamma, floor = 0.5, 0.2, 3.0, 2.0, 0.05
    module = Holder()
    bema = EMA(ema_power=kappa, bias_power=eta, lag=rho, multiplier=gamma, min_ema_multiplier=floor,
               update_after=update_after, update_every=update_every)
    bema.setup(module)
    weights = [p for p in module.model.parameters() if p.requires_grad]
    theta0 = [w.detach().clone() for w in weights]
    ema, alpha = [w.detach().clone() for w in weights], 0.0
    g = torch.Generator().manual_seed(1)
    for step in range(1, 9):
        with torch.no_grad():
            for w in weights:
                w.add_(torch.randn(w.shape, generator=g, dtype=w.dtype))
        bema.on_after_optimizer_step(module)
        t = step - update_after
        if t == 0:
            theta0 = [w.detach().clone() for w in weights]
            ema = [w.detach().clone() for w in weights]
        elif t > 0 and t % update_every == 0:
            beta = max((rho + gamma * step) ** -kappa, floor)
            ema = [(1 - beta) * e + beta * w.detach() for e, w in zip(ema, weights)]
            alpha = (rho + gamma * step) ** -eta
        assert bema.alpha == pytest.approx(alpha, rel=1e-15)
        for a, e in zip(bema.average, ema):
            torch.testing.assert_close(a, e, rtol=1e-13, atol=1e-15)
    live = [w.detach().clone() for w in weights]
    with bema.eval_weights(module):
        for w, e, l0, t0 in zip(weights, ema, live, theta0):
            torch.testing.assert_close(w.detach(), e + alpha * (l0 - t0), rtol=1e-13, atol=1e-15)
    assert all(torch.equal(w.detach(), l0) for w, l0 in zip(weights, live))  # restored bit for bit
    assert alpha > 0 and not torch.allclose(ema[0], ema[0] + alpha * (live[0] - theta0[0]))  # it corrects


def test_bema_state_resumes_and_a_mismatched_checkpoint_is_refused():
    module = Holder()
    bema = EMA(ema_power=0.5, bias_power=0.2, update_after=1)
    bema.setup(module)
    for _ in range(3):
        with torch.no_grad():
            module.model[0].weight.add_(1.0)
        bema.on_after_optimizer_step(module)
    resumed = EMA(ema_power=0.5, bias_power=0.2, update_after=1)
    resumed.setup(Holder())
    resumed.load_state_dict(bema.state_dict())
    assert resumed.alpha == bema.alpha and resumed.num_updates == 2 and resumed._steps == 3
    assert all(torch.equal(a, b) for a, b in zip(resumed.theta0 + resumed.average, bema.theta0 + bema.average))
    plain = EMA()
    plain.setup(Holder())
    with pytest.raises(ValueError, match="saved with BEMA's bias correction; resume with the bias_power"):
        plain.load_state_dict(bema.state_dict())
    with pytest.raises(ValueError, match="EMA.bias_power must be >= 0, got -1"):
        EMA(bias_power=-1)
    early = EMA(ema_power=0.5, bias_power=0.2, update_after=5)  # a fit that ends within its burn-in
    early.setup(module)
    with torch.no_grad():
        module.model[0].weight.add_(1.0)
    early.on_after_optimizer_step(module)
    live = module.model[0].weight.detach().clone()
    with early.eval_weights(module):
        assert torch.equal(module.model[0].weight.detach(), live)  # no average yet: the live weights
    early.on_train_end(module)
    assert torch.equal(module.model[0].weight.detach(), live)  # what it trained is kept


def test_ema_with_nothing_trainable_updates_nothing():
    module = Holder()
    module.model.requires_grad_(False)
    ema = EMA(decay=0.9)
    ema.setup(module)
    ema.on_after_optimizer_step(module)  # an empty fused update would raise
    assert ema.average == [] and ema.num_updates == 0
