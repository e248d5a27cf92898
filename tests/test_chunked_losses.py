"""The losses formed from hidden states a chunk at a time (`heads.head_sum`): the same values and
gradients as whole (B, T, V) logits, in float64, and a training step that never holds (B, T, V)."""

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from cfs_lightning.data import ReplayConfig, ReplayDataModule
from cfs_lightning.tasks import TaskSource
from cfs_lightning.tokens import IGNORE_INDEX
from cfs_lightning.training import CausalLMFineTuner
from cfs_lightning.training import heads
from cfs_lightning.training.heads import Logits, postprocess_logits
from cfs_lightning.training.losses import chunked_target_mean, mean_token_loss, nll, token_divergence
from cfs_lightning.training.regularizers import KLToReference, NLLReplay, topk_forward_kl
from cfs_lightning.training.task_losses.dft import dft
from cfs_lightning.training.task_losses.eaft import EAFT

B, T, H, V = 3, 7, 5, 13


class _Capped:
    final_logit_softcapping = 4.0


def _case(seed: int = 0, softcap: bool = False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(H, V, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, H, generator=g) * 2)
        head.bias.copy_(torch.randn(V, generator=g))
    config = _Capped() if softcap else None
    fn = (lambda h: postprocess_logits(config, head(h))) if softcap else head
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 4:] = IGNORE_INDEX  # padding
    labels[2, :3] = IGNORE_INDEX  # a prompt
    ref = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    return hidden, head, fn, labels, ref


def _whole_mean(values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over the (B, T) positions whose next label is a target."""
    valid = F.pad(labels[:, 1:] != IGNORE_INDEX, (0, 1), value=False)
    return values[valid].sum() / valid.sum()


def _top4_entropy(z: torch.Tensor) -> torch.Tensor:
    """EAFT's weight by hand: entropy of the softmax over the 4 largest logits, over log 4, detached."""
    logp = z.detach().sort(-1, descending=True).values[..., :4].log_softmax(-1)
    return -(logp.exp() * logp).sum(-1) / math.log(4)


TERMS = {
    "nll": (lambda z, y, r: nll(z, y), lambda z, y, r: F.cross_entropy(z.transpose(1, 2), y.clamp(min=0), reduction="none")),
    "dft": (lambda z, y, r: dft(z, y),
            lambda z, y, r: (lambda n: n * torch.exp(-n.detach()))(F.cross_entropy(z.transpose(1, 2), y.clamp(min=0), reduction="none"))),
    "eaft": (lambda z, y, r: EAFT(k=4).per_token(z, y),
             lambda z, y, r: F.cross_entropy(z.transpose(1, 2), y.clamp(min=0), reduction="none") * _top4_entropy(z)),
    "forward_kl": (lambda z, y, r: token_divergence(z, r),
                   lambda z, y, r: (r.softmax(-1) * (r.log_softmax(-1) - z.log_softmax(-1))).sum(-1)),
    "reverse_kl": (lambda z, y, r: token_divergence(z, r, "reverse"),
                   lambda z, y, r: (z.softmax(-1) * (z.log_softmax(-1) - r.log_softmax(-1))).sum(-1)),
    "jsd": (lambda z, y, r: token_divergence(z, r, beta=0.3), None),
    "topk_kl": (lambda z, y, r: topk_forward_kl(z, *r.log_softmax(-1).topk(4, dim=-1)[::-1]), None),
}


@pytest.mark.parametrize("softcap", [False, True])
@pytest.mark.parametrize("term", sorted(TERMS))
def test_chunked_head_matches_whole_logits_in_value_and_gradients(term, softcap):
    chunked, by_hand = TERMS[term]
    hidden, head, fn, labels, ref = _case(softcap=softcap)
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    params = [hidden, head.weight, head.bias]
    # the reference: whole (B, T, V) logits, plain autograd
    whole = fn(hidden)
    per_position = (by_hand or chunked)(whole, targets, ref)
    expected = _whole_mean(per_position, labels)
    expected_grads = torch.autograd.grad(expected, params)
    for size in (1, 3, None):
        stream = Logits(hidden, fn, tuple(head.parameters()), V)
        got = chunked_target_mean(lambda z, y, r: chunked(z, y, r), labels, stream, targets, ref, chunk_size=size)
        grads = torch.autograd.grad(got, params)
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
        for g, e in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    assert expected.item() != 0 and all(g.abs().sum() > 0 for g in expected_grads)


def test_the_gradient_reaches_only_what_requires_it_and_scales_with_the_loss_weight():
    hidden, head, fn, labels, _ = _case(1)
    head.bias.requires_grad_(False)
    stream = Logits(hidden, fn, tuple(head.parameters()), V)
    (2.5 * mean_token_loss(stream, labels, chunk_size=2)).backward()
    assert head.bias.grad is None
    expected = torch.autograd.grad(2.5 * _whole_mean(F.cross_entropy(
        fn(hidden).transpose(1, 2), F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX).clamp(min=0),
        reduction="none"), labels), [hidden, head.weight])
    torch.testing.assert_close(hidden.grad, expected[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(head.weight.grad, expected[1], rtol=1e-10, atol=1e-12)
    twice = mean_token_loss(stream, labels)
    twice.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="differentiated twice"):
        twice.backward()
    with torch.no_grad():  # no gradient wanted: values only, no graph
        assert not mean_token_loss(Logits(hidden, fn, tuple(head.parameters()), V), labels).requires_grad


def test_chunk_size_is_refused_below_one_and_sized_by_the_vocabulary_otherwise():
    assert heads.chunk_tokens(262_144) == 256 and heads.chunk_tokens(49_152) == 1365
    assert heads.chunk_tokens(262_144, 7) == 7
    with pytest.raises(ValueError, match="chunk_size must be >= 1 or None, got 0"):
        heads.chunk_tokens(100, 0)


class _LargestLogits(TorchDispatchMode):
    """Records the largest number of rows of any (N, V) or (B, T, V) tensor an op produces (4-dim
    attention masks and scores, (B, 1, T, T), are not logits even where T = V, nor is the head's
    weight transposed, (H, V))."""

    def __init__(self, vocab: int, hidden: int) -> None:
        super().__init__()
        self.vocab, self.weight, self.rows, self.shape = vocab, (hidden, vocab), 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if (isinstance(t, torch.Tensor) and t.dim() in (2, 3) and t.size(-1) == self.vocab
                    and tuple(t.shape) != self.weight):
                if t.numel() // self.vocab > self.rows:
                    self.rows, self.shape = t.numel() // self.vocab, tuple(t.shape)
        return out


def test_a_training_step_never_holds_the_whole_logits(tiny_model_dir, tiny_task_files, tiny_replay_dir, monkeypatch):
    """Task NLL, replay NLL and a KL to the frozen reference, forward and backward: no tensor with
    the vocabulary as its last dimension has more rows than one chunk (8 tokens here), while the
    batch holds hundreds of target positions."""
    model = CausalLMFineTuner(str(tiny_model_dir), regularizers=[NLLReplay(), KLToReference()])
    vocab = model.hf_model.config.vocab_size
    assert model.head_split
    monkeypatch.setattr(heads, "LOGITS_PER_CHUNK", 8 * vocab)
    task = TaskSource(path="json", data_files=tiny_task_files, prompt="Q: {question}\nA:", response=" {answer}",
                      val_split="test", max_length=512)
    dm = ReplayDataModule(task, tokenizer=str(tiny_model_dir), batch_size=4, replay_ratio=0.5,
                          replay=ReplayConfig(dir=str(tiny_replay_dir), val_size=8))
    split, seen = _largest_in_a_step(model, dm, vocab)
    assert seen["positions"] > 100
    assert 0 < split.rows <= 8, f"a {split.shape} tensor was formed"
    # the same step with whole logits (the head not split off) does form them: the check can fail
    model = CausalLMFineTuner(str(tiny_model_dir), regularizers=[NLLReplay(), KLToReference()])
    model.head_split = False
    whole, _ = _largest_in_a_step(model, dm, vocab)
    assert whole.rows >= seen["positions"] / 2


def _largest_in_a_step(model, dm, vocab):
    spy, seen = _LargestLogits(vocab, model.hf_model.config.hidden_size), {}

    class Watch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen["positions"] = sum(b["attention_mask"].sum().item() for b in batch.values())
            spy.__enter__()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            spy.__exit__(None, None, None)

    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Watch()],
                        limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    return spy, seen


def test_activation_checkpointing_keeps_the_gradients_and_saves_a_fraction_of_the_activations(tiny_model_dir):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 500, (4, 128), generator=g)
    mask, labels = torch.ones_like(ids), ids.clone()
    found = {}
    for on in (False, True):
        module = CausalLMFineTuner(str(tiny_model_dir), activation_checkpointing=on)
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            hidden = module.logits(ids, mask)
        mean_token_loss(hidden, labels).backward()
        found[on] = (sum(saved), {n: p.grad for n, p in module.model.named_parameters()})
    assert found[True][0] < 0.5 * found[False][0], found
    for name, grad in found[False][1].items():
        torch.testing.assert_close(found[True][1][name], grad, rtol=1e-5, atol=1e-7)


def test_the_documented_term_example_is_the_entropy_of_the_whole_logits(tiny_model_dir, tmp_path, monkeypatch):
    """docs/methods.md's example of a new term runs on the module's `Logits` and equals the same
    mean computed from whole logits."""
    import re

    from .conftest import REPO

    code = re.search(r"<!-- term-example -->\n```python\n(.*?)```", (REPO / "docs/methods.md").read_text(), re.S)
    (tmp_path / "my_terms.py").write_text(code.group(1))
    monkeypatch.syspath_prepend(str(tmp_path))
    from my_terms import ReplayEntropy

    module = CausalLMFineTuner(str(tiny_model_dir))
    ids = torch.randint(3, 500, (2, 9), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[1, 6:] = IGNORE_INDEX
    batch = {"replay": {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}}
    got = ReplayEntropy()(batch, {"replay": module.logits(ids, torch.ones_like(ids))})
    logp = module(ids, torch.ones_like(ids)).log_softmax(-1)
    expected = _whole_mean(-(logp.exp() * logp).sum(-1), labels)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    got.backward()
    assert module.hf_model.get_output_embeddings().weight.grad.abs().sum() > 0
