"""What trains: freezing by name and the bottom blocks, and LLaMA-Pro block expansion on every
family of the compatibility matrix (identity at the start, per-layer cache and attention types,
a checkpoint that reloads as the expanded model)."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from cfs_lightning.shards import model_fingerprint
from cfs_lightning.training import CausalLMFineTuner
from cfs_lightning.training.lora import LoRA
from cfs_lightning.training.trainable import Trainable, apply_trainable, decoder_blocks

from .families import FAMILIES


def _tiny(family) -> torch.nn.Module:
    config = AutoConfig.for_model(family.model_type, vocab_size=128, **{**family.config, "pad_token_id": 0})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def _greedy(model, prompt) -> list[int]:
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)[0].tolist()


@pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
def test_block_expansion_starts_as_the_base_and_exports_the_expanded_model(family, tmp_path):
    base = _tiny(family)
    model = _tiny(family)
    prompt = torch.tensor([[5, 17, 3, 99, 42, 7, 64]])
    apply_trainable(model, Trainable(expand_blocks=2))
    _, blocks = decoder_blocks(model)
    assert len(blocks) == 4 and model.config.num_hidden_layers == 4
    if getattr(base.config, "layer_types", None) is not None:  # a copy takes its source's attention type
        assert model.config.layer_types == [t for t in base.config.layer_types for _ in (0, 1)]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(any(f".{i}." in n for i in (1, 3)) for n in trainable)  # the copies alone
    with torch.no_grad():
        torch.testing.assert_close(model(prompt).logits, base(prompt).logits, rtol=1e-5, atol=1e-5)
    assert _greedy(model, prompt) == _greedy(base, prompt)  # the KV cache indexes the new blocks right
    with torch.no_grad():  # as after training: the new blocks no longer add nothing
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
        trained = model(prompt).logits
    assert not torch.allclose(trained, base(prompt).logits, atol=1e-4)
    model.save_pretrained(tmp_path / "expanded")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "expanded").eval()
    assert reloaded.config.num_hidden_layers == 4 and reloaded.config.expanded_blocks["added"] == [1, 3]
    # the base's replay shards still match: the added blocks are left out of the fingerprint
    assert model_fingerprint(reloaded) == model_fingerprint(model) == model_fingerprint(base)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(prompt).logits, trained, rtol=1e-5, atol=1e-5)
    assert _greedy(reloaded, prompt) == _greedy(model, prompt)


def test_freezing_by_name_and_the_bottom_blocks(tiny_model_dir):
    model = CausalLMFineTuner(str(tiny_model_dir), trainable=Trainable(freeze_bottom=1, freeze=[r"\.mlp\."]))
    name, blocks = decoder_blocks(model.model)
    frozen = {n for n, p in model.model.named_parameters() if not p.requires_grad}
    embeddings = {n for n, p in model.model.named_parameters() if p is model.model.get_input_embeddings().weight}
    assert embeddings <= frozen
    assert {n for n, _ in model.model.named_parameters() if n.startswith(f"{name}.0.")} <= frozen
    assert {n for n, _ in model.model.named_parameters() if ".mlp." in n} <= frozen
    left = {n for n, p in model.model.named_parameters() if p.requires_grad}
    assert left and all(n.startswith(f"{name}.1.") and ".mlp." not in n or not n.startswith(name) for n in left)
    assert any(n.startswith(f"{name}.1.self_attn") for n in left)


def test_trainable_settings_that_cannot_work_are_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="must divide the model's 2 decoder blocks"):
        CausalLMFineTuner(str(tiny_model_dir), trainable=Trainable(expand_blocks=3))
    with pytest.raises(ValueError, match="freeze_bottom=5, but the model has 2 decoder blocks"):
        CausalLMFineTuner(str(tiny_model_dir), trainable=Trainable(freeze_bottom=5))
    with pytest.raises(ValueError, match="freezes every parameter"):
        CausalLMFineTuner(str(tiny_model_dir), trainable=Trainable(freeze=["."]))
    with pytest.raises(ValueError, match=r"'\(' is not a regular expression"):
        Trainable(freeze=["("])
    with pytest.raises(ValueError, match="model.trainable and model.lora both choose what trains"):
        CausalLMFineTuner(str(tiny_model_dir), trainable=Trainable(freeze_bottom=1), lora=LoRA())
