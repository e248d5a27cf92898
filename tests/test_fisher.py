"""EWC without the original data: `cfs fisher`'s diagonal Fisher of the base model on its replay
sequences (against the exact true Fisher of a tiny float64 model), its folder and provenance, and
`L2ToInit(fisher=...)`'s term against float64 by hand."""

import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from cfs_lightning.loading import BaseModelArgs
from cfs_lightning.replay.fisher import FisherOutput, estimate_fisher, fisher
from cfs_lightning.shards import model_fingerprint
from cfs_lightning.shards.fisher import read_fisher, write_fisher
from cfs_lightning.training.regularizers import L2ToInit

V = 11


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=V, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    model = LlamaForCausalLM(config).double()
    with torch.no_grad():
        model.lm_head.weight.mul_(8)  # peaked next-token distributions: the empirical Fisher differs more
    return model


def _exact_and_empirical(model, sequences) -> tuple[torch.Tensor, torch.Tensor]:
    """By enumeration: sum over positions of E_{y ~ p} (d log p(y) / d theta)^2 (the true Fisher),
    and of the squared gradient at the observed token (the empirical one), each per position."""
    params = [p for p in model.parameters() if p.requires_grad]
    true, empirical, positions = 0, 0, 0
    for ids in sequences:
        logp = model(input_ids=torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
        for t in range(len(ids) - 1):
            for y in range(V):
                grads = torch.autograd.grad(logp[t, y], params, retain_graph=True)
                g2 = torch.cat([g.flatten() for g in grads]).square()
                true = true + logp[t, y].exp().detach() * g2
                if y == ids[t + 1]:
                    empirical = empirical + g2
            positions += 1
    return true / positions, empirical / positions


def test_the_estimate_is_the_true_fisher_not_the_empirical_one():
    model = _tiny_llama()
    g = torch.Generator().manual_seed(1)
    sequences = [torch.randint(0, V, (n,), generator=g).tolist() for n in (5, 4, 6)]  # not the model's samples
    exact, empirical = _exact_and_empirical(model, sequences)
    draws = 400
    estimates = [estimate_fisher(model, sequences, seed=s, show=False) for s in range(draws)]
    assert {n for _, n in estimates} == {12}  # positions: 4 + 3 + 5
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    mean = sum(torch.cat([est[n].flatten() for n in names]) for est, _ in estimates) / draws
    assert estimates[0][0][names[0]].dtype == torch.float32
    relative = (mean - exact).abs().sum() / exact.abs().sum()
    assert relative < 0.1  # the mean of the estimates converges to the exact true Fisher
    assert (empirical - exact).abs().sum() / exact.abs().sum() > 3 * relative  # which the empirical one is not
    assert all(p.grad is None for p in model.parameters())  # no gradient left behind


def test_the_command_writes_provenance_reuses_it_and_refuses_other_settings(tmp_path, tiny_model_dir,
                                                                          tiny_replay_dir, capsys):
    base = BaseModelArgs(str(tiny_model_dir), device="cpu")
    out = FisherOutput(str(tmp_path / "fisher"))
    record = fisher(base, str(tiny_replay_dir), out, sequences=4, seed=3)
    values, saved = read_fisher(out.dir)
    model = base.load()[0]
    assert saved == {"format": "cfs_lightning.fisher/1", **record}
    assert saved["model_fingerprint"] == model_fingerprint(model) and saved["sequences"] == 4 and saved["seed"] == 3
    assert set(values) == {n for n, _ in model.named_parameters()}
    assert all(v.dtype == torch.float32 and (v >= 0).all() for v in values.values()) and saved["max"] > 0
    assert (tmp_path / "fisher" / "fisher.safetensors").stat().st_mode & 0o044  # readable by others (umask)
    capsys.readouterr()
    fisher(base, str(tiny_replay_dir), out, sequences=4, seed=3)  # the same settings: nothing to do
    assert "already there" in capsys.readouterr().out
    with pytest.raises(FileExistsError, match="made with other settings.*output.overwrite=true"):
        fisher(base, str(tiny_replay_dir), out, sequences=4, seed=4)
    assert json.loads((tmp_path / "fisher" / "fisher.json").read_text())["seed"] == 3  # left as it was
    fisher(base, str(tiny_replay_dir), FisherOutput(out.dir, overwrite=True), sequences=4, seed=4)
    assert read_fisher(out.dir)[1]["seed"] == 4
    (tmp_path / "fisher" / "fisher.safetensors").unlink()  # a clone that keeps only the record
    with pytest.raises(FileNotFoundError, match="record of a Fisher estimate but not its fisher.safetensors"):
        read_fisher(out.dir)
    fisher(base, str(tiny_replay_dir), out, sequences=4, seed=4)  # estimated again, not "already there"
    assert "already there" not in capsys.readouterr().out
    assert set(read_fisher(out.dir)[0]) == set(values)


class _Holder(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)).double()
        self.model[1].bias.requires_grad_(False)
        self.model.config = SimpleNamespace()
        self.hf_model = self.model


def _fisher_for(module: _Holder, folder, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    values = {n: scale * torch.rand(p.shape, generator=g) for n, p in module.model.named_parameters()}
    write_fisher(folder, values, {"model": "holder", "model_fingerprint": model_fingerprint(module.model)})
    return values


def test_ewc_is_the_fisher_weighted_distance_and_l2_with_a_unit_fisher(tmp_path):
    module = _Holder()
    values = _fisher_for(module, tmp_path / "f")
    write_fisher(tmp_path / "ones", {n: torch.ones(p.shape) for n, p in module.model.named_parameters()},
                 {"model": "holder", "model_fingerprint": model_fingerprint(module.model)})
    ewc = L2ToInit(weight=0.5, fisher=str(tmp_path / "f"))
    per_parameter = L2ToInit(fisher=str(tmp_path / "f"), offload=True)  # the one-tensor-at-a-time path
    unit, plain = L2ToInit(fisher=str(tmp_path / "ones")), L2ToInit()
    for reg in (ewc, per_parameter, unit, plain):
        reg.setup(module)  # at the base weights, as a fit does before any step or restore
    assert (ewc.name, plain.name) == ("ewc", "l2_to_init")
    start = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(torch.randn_like(p))
    term = ewc({}, {})
    trainable = [(n, p) for n, p in module.model.named_parameters() if p.requires_grad]
    expected = sum((values[n].double() * (p.detach() - start[n]) ** 2).sum() for n, p in trainable)
    assert term.item() == pytest.approx(expected.item(), rel=1e-6)  # F rounded to float32 on disk
    term.backward()
    for n, p in trainable:
        torch.testing.assert_close(p.grad, 2 * values[n].double() * (p.detach() - start[n]), rtol=1e-6, atol=1e-12)
    assert per_parameter({}, {}).item() == pytest.approx(expected.item(), rel=1e-6)
    assert unit({}, {}).item() == pytest.approx(plain({}, {}).item(), rel=1e-12)  # EWC with F = 1 is l2


def test_ewc_refuses_a_fisher_of_another_model_or_of_other_parameters(tmp_path):
    module = _Holder()
    _fisher_for(module, tmp_path / "f")
    with torch.no_grad():
        module.model[0].bias.add_(0.1)  # now another model than the Fisher's
    with pytest.raises(ValueError, match="was estimated for 'holder'.*run `cfs fisher` on this base model"):
        L2ToInit(fisher=str(tmp_path / "f")).check_base(module.hf_model)  # as a fit does, before sharding
    module.model.config.expanded_blocks = {"prefix": "layers", "added": [1]}
    with pytest.raises(ValueError, match="the model was expanded .*only its new blocks train, and they have none"):
        L2ToInit(fisher=str(tmp_path / "f")).check_base(module.hf_model)
    write_fisher(tmp_path / "g", {"0.weight": torch.ones(4, 3)}, {"model": "x", "model_fingerprint": "0"})
    with pytest.raises(ValueError, match=r"no estimate \(of the right shape\) for 2 trainable parameter\(s\), "
                                         r"e.g. '0.bias'.*adapters \(LoRA\)"):
        L2ToInit(fisher=str(tmp_path / "g")).setup(module)
    with pytest.raises(FileNotFoundError, match="holds no fisher.json: it is not a Fisher estimate"):
        L2ToInit(fisher=str(tmp_path)).setup(module)
    L2ToInit().check_base(module.hf_model)  # no Fisher: nothing to check
