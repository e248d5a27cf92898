import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cfs_lightning.evaluation import evaluate_lm, task_specs
from cfs_lightning.cli import main
from cfs_lightning.experiments.init_model import init_model
from cfs_lightning.experiments.wise_ft import interpolated_state

from .conftest import REPO, SHAKESPEARE, TINY_LLAMA

TASKS = [str(REPO / "configs/tasks/shakespeare_heldout.yaml"), str(REPO / "configs/tasks/gsm8k_answers.yaml")]
RET, DOWN = "shakespeare_heldout/bits_per_byte", "gsm8k_answers/bits_per_byte"


@pytest.fixture(scope="module")
def finetuned_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model with every weight moved: a stand-in for a fine-tuned export."""
    out = tmp_path_factory.mktemp("ft") / "ft"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


def test_interpolate_endpoints_are_the_two_models(tmp_path, tiny_model_dir, finetuned_dir):
    main(["interpolate", f"--base={tiny_model_dir}", f"--finetuned={finetuned_dir}",
          f"--tasks={json.dumps(TASKS)}", f"--retained={RET}", f"--downstream={DOWN}",
          "--alphas=[0, 0.5, 1]", "--limit=4", "--batch_size=4", "--device=cpu",
          f"--output_dir={tmp_path / 'w'}"])
    rows = json.loads((tmp_path / "w" / "wise_ft.json").read_text())
    assert [r["alpha"] for r in rows] == [0, 0.5, 1]
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for alpha, name in ((0, tiny_model_dir), (1, finetuned_dir)):
        scores, _ = evaluate_lm(AutoModelForCausalLM.from_pretrained(name), tok, task_specs(TASKS),
                                batch_size=4, limit=4)
        row = next(r for r in rows if r["alpha"] == alpha)
        assert row[RET] == pytest.approx(scores[RET], rel=1e-5)
        assert row[DOWN] == pytest.approx(scores[DOWN], rel=1e-5)
    assert rows[0][RET] != rows[2][RET]
    assert "| 0.5 |" in (tmp_path / "w" / "wise_ft.md").read_text()
    assert (tmp_path / "w" / "wise_ft.png").read_bytes()[:4] == b"\x89PNG"


def test_interpolation_is_linear_and_refuses_other_architectures(tmp_path, tiny_model_dir, finetuned_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    ft = AutoModelForCausalLM.from_pretrained(finetuned_dir).state_dict()
    mid = interpolated_state(base, ft, 0.25)
    name = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(mid[name], 0.75 * base[name] + 0.25 * ft[name])
    other = tmp_path / "wide"
    init_model(str(other), [str(SHAKESPEARE / "train.txt")], vocab_size=512,
               model_config={**TINY_LLAMA, "hidden_size": 64}, seed=0)
    wide = AutoModelForCausalLM.from_pretrained(other).state_dict()
    with pytest.raises(ValueError, match="shape"):
        interpolated_state(base, wide, 0.5)
