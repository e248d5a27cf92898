import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cfs_lightning.evaluation import evaluate_lm, task_specs
from cfs_lightning.cli import main
from cfs_lightning.experiments.init_model import init_model
from cfs_lightning.experiments.wise_ft import AlphaSelection, interpolated_state, run_scores
from cfs_lightning.scores import ITEM_CHANGES, read_scores

from .conftest import REPO, SHAKESPEARE, TINY_LLAMA

TASKS = [str(REPO / "configs/tasks/shakespeare_heldout.yaml"), str(REPO / "configs/tasks/gsm8k_answers.yaml")]
RET, DOWN = "shakespeare_heldout/bits_per_byte", "gsm8k_answers/bits_per_byte"
VAL_TASKS = [t.replace(".yaml", "_val.yaml") for t in TASKS]
VAL_RET, VAL_DOWN = "shakespeare_heldout_val/bits_per_byte", "gsm8k_answers_val/bits_per_byte"
CHOICE = str(REPO / "configs/tasks/analogies.yaml")  # scored 0 or 1 per document: per-item changes


@pytest.mark.parametrize("name", ["shakespeare_heldout", "gsm8k_answers", "code_heldout", "number_words"])
def test_validation_documents_are_the_last_200_and_never_test_documents(name):
    """What WiSE-FT's alpha is chosen on is never in what the report shows."""
    from lm_eval.tasks import TaskManager

    specs = task_specs([str(REPO / f"configs/tasks/{name}.yaml"), str(REPO / f"configs/tasks/{name}_val.yaml")])
    tasks = TaskManager(include_defaults=False).load_task_or_group(specs)
    test, val = (list(tasks[key].test_docs()) for key in (name, f"{name}_val"))
    assert len(val) == 200 and len(test) > 200
    key = "question" if name == "gsm8k_answers" else "number" if name == "number_words" else "text"
    assert not {d[key] for d in test} & {d[key] for d in val}


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
          f"--tasks={json.dumps(TASKS + [CHOICE])}", f"--retained={RET}", f"--downstream={DOWN}",
          "--alphas=[0, 0.5, 1]", "--limit=4", "--batch_size=4", "--device=cpu",
          f"--select_on.tasks={json.dumps(VAL_TASKS)}", f"--select_on.retained={VAL_RET}",
          f"--select_on.downstream={VAL_DOWN}", f"--output_dir={tmp_path / 'w'}"])
    sweep = json.loads((tmp_path / "w" / "wise_ft.json").read_text())
    assert sweep["select_on"] == {"tasks": VAL_TASKS, "retained": VAL_RET, "downstream": VAL_DOWN}
    rows = sweep["rows"]
    assert [r["alpha"] for r in rows] == [0, 0.5, 1]
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    for alpha, name in ((0, tiny_model_dir), (1, finetuned_dir)):
        scores, _, _ = evaluate_lm(AutoModelForCausalLM.from_pretrained(name), tok, task_specs(TASKS + VAL_TASKS),
                                batch_size=4, limit=4)
        row = next(r for r in rows if r["alpha"] == alpha)
        for key in (RET, DOWN, VAL_RET, VAL_DOWN):
            assert row[key] == pytest.approx(scores[key], rel=1e-5)
        assert row[VAL_RET] != row[RET]  # other documents
    assert rows[0][RET] != rows[2][RET]
    assert "| 0.5 |" in (tmp_path / "w" / "wise_ft.md").read_text()
    assert (tmp_path / "w" / "wise_ft.png").read_bytes()[:4] == b"\x89PNG"
    # the run's scores, as a fit's: the base (alpha 0), then the alpha chosen on the validation metrics
    base, chosen = read_scores(tmp_path / "w")
    assert base["alpha"] == 0 and base[f"eval/{RET}"] == rows[0][RET] and base[f"forget/{RET}"] == 0
    assert chosen["chosen_on"] == [VAL_RET, VAL_DOWN] and chosen["alpha"] in (0, 0.5, 1)
    picked = next(r for r in rows if r["alpha"] == chosen["alpha"])
    assert chosen[f"eval/{DOWN}"] == picked[DOWN]
    assert chosen[f"forget/{RET}"] == pytest.approx(picked[RET] - rows[0][RET])  # bits per byte: higher is worse
    # and per item, against alpha 0: what was gained less what was lost is the change in accuracy
    assert {k for k in chosen if k.startswith("items/")} == {f"items/analogies/acc/{c}" for c in ITEM_CHANGES}
    assert chosen["items/analogies/acc/gained"] - chosen["items/analogies/acc/forgotten"] == pytest.approx(
        picked["analogies/acc"] - rows[0]["analogies/acc"])
    assert base["items/analogies/acc/forgotten"] == base["items/analogies/acc/gained"] == 0


def test_the_chosen_alpha_has_its_per_item_changes_since_alpha_0():
    rows = [{"alpha": 0.0, "t/acc": 0.5}, {"alpha": 1.0, "t/acc": 0.5}]
    items = {0.0: {"t/acc": {"0": [1.0, 0.5], "1": [0.0, 0.5]}},
             1.0: {"t/acc": {"0": [0.0, 0.5], "1": [1.0, 0.5]}}}  # both documents flip, either way
    selection = AlphaSelection(tasks=["v"], retained="t/acc", downstream="t/acc")
    base, chosen = run_scores(rows, rows[1], selection, {"t/acc": True}, items)
    assert chosen["items/t/acc/forgotten"] == chosen["items/t/acc/gained"] == 0.5
    assert base["items/t/acc/forgotten"] == base["items/t/acc/gained"] == 0.0
    assert chosen["alpha"] == 1.0 and chosen["forget/t/acc"] == 0.0


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
