import json
import shutil

import pytest
import yaml

import cfs_lightning.experiments.study
from cfs_lightning.experiments.runs import DONE
from cfs_lightning.experiments.study import DataStep, Method, study
from cfs_lightning.scores import SCORES_FILE

from .conftest import REPO

RET, DOWN = "shakespeare_heldout/bits_per_byte", "gsm8k_answers/bits_per_byte"
# WiSE-FT is a method like any other: a command run per seed, on another method's export
WISE_FT = Method("wise-ft", ["configs/toy/interpolate.yaml"], command="interpolate",
                 args=["--finetuned={runs.ft}/hf_model", "--alphas=[0.0, 0.5, 1.0]", "--batch_size=4", "--limit=4"])


def _study(tiny_model_dir, out, **kw):
    return study(
        base=str(tiny_model_dir), fit_config="configs/toy/base/finetune.yaml", retained=RET, downstream=DOWN,
        output_dir=str(out), seeds=[0, 1],
        fit_args=["--data.init_args.task.split=train[:24]", "--data.init_args.task.val_split=test[:4]",
                  "--data.init_args.batch_size=4", "--trainer.max_epochs=2",
                  "--trainer.callbacks.init_args.limit=4", "--trainer.callbacks.init_args.batch_size=4",
                  "--data.init_args.replay.dir={data.cfs}", "--data.init_args.replay.val_size=8"],
        data=[DataStep("cfs", "generate", "configs/toy/data/cfs.yaml",
                       {"budget.sequences": 20, "sampling.max_new_tokens": 8, "sampling.batch_size": 10,
                        "store_topk": 0})],
        methods=[Method("ft", ["configs/toy/methods/ft.yaml"]), Method("cfs", ["configs/toy/methods/cfs-nll.yaml"], seeds=[0]),
                 WISE_FT], **kw)


def test_study_fits_every_method_and_seed_reports_and_resumes(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.chdir(REPO)
    out = tmp_path / "study"
    calls = []
    real_fit = cfs_lightning.experiments.study.run_fit
    monkeypatch.setattr(cfs_lightning.experiments.study, "run_fit", lambda *a: calls.append(a) or real_fit(*a))
    summary = _study(tiny_model_dir, out)
    assert len(calls) == 3  # ft x 2 seeds, cfs x 1 seed
    runs = out / "methods"
    for run in ("ft/seed0", "ft/seed1", "cfs/seed0"):
        history = json.loads((runs / run / SCORES_FILE).read_text())
        assert [h["step"] for h in history] == [0, 6, 12]  # the start, then 2 epochs of 6 steps
        assert (runs / run / "hf_model" / "config.json").is_file()
    assert (runs / "wise-ft" / "seed1" / "wise_ft.json").is_file() and (runs / "wise-ft" / "seed1" / SCORES_FILE).is_file()
    assert not (runs / "cfs" / "seed1").exists()
    seeds = [json.loads((runs / f"ft/seed{k}" / SCORES_FILE).read_text())[-1][f"eval/{DOWN}"] for k in (0, 1)]
    assert seeds[0] != seeds[1]  # the seed reaches the data order
    assert summary["methods"]["ft"]["seeds"] == 2 and summary["methods"]["cfs"]["seeds"] == 1
    assert summary["methods"]["wise-ft"]["alpha"][0] in (0.0, 0.5, 1.0)
    table = (out / "report" / "results.md").read_text()
    assert "| ft | 2 |" in table and "| cfs | 1 |" in table and (out / "report" / "tradeoff.png").is_file()

    # a rerun skips everything; an interrupted fit (no done.json) is redone from the start
    (runs / "ft" / "seed1" / DONE).unlink()
    (runs / "ft" / "seed1" / "stale.txt").write_text("left by the killed run")
    shutil.rmtree(runs / "wise-ft" / "seed0")
    calls.clear()
    again = _study(tiny_model_dir, out)
    assert [c[1][1] for c in calls] == ["--seed_everything=1"]
    assert not (runs / "ft" / "seed1" / "stale.txt").exists()
    assert (runs / "wise-ft" / "seed0" / "wise_ft.json").is_file()
    assert again["methods"]["cfs"] == summary["methods"]["cfs"]

    # records copied without models (a real study's committed runs): the WiSE-FT run that reads an
    # ft export that is gone names it and the fix, and its own folder is left as it was
    shutil.rmtree(runs / "ft" / "seed1" / "hf_model")
    shutil.rmtree(runs / "wise-ft" / "seed1")
    with pytest.raises(FileNotFoundError, match=r"wise-ft .*seed1.* reads .*ft/seed1/hf_model.*delete that run's folder"):
        _study(tiny_model_dir, out)
    assert not (runs / "wise-ft" / "seed1").exists()


def test_study_config_errors_are_named_before_anything_runs(tmp_path, monkeypatch, tiny_model_dir):
    monkeypatch.chdir(REPO)
    with pytest.raises(KeyError, match=r"method ft: unknown placeholder \{data.nope\}"):
        study(str(tiny_model_dir), "configs/toy/base/finetune.yaml", [Method("ft", args=["--x={data.nope}"])],
              RET, DOWN, output_dir=str(tmp_path / "s"))
    with pytest.raises(KeyError, match=r"method wise-ft: unknown placeholder \{runs.ft\}"):  # ft must come first
        study(str(tiny_model_dir), "configs/toy/base/finetune.yaml", [WISE_FT, Method("ft")], RET, DOWN,
              output_dir=str(tmp_path / "s"))
    with pytest.raises(ValueError, match="method 'x': 'report' cannot run as a step here"):
        study(str(tiny_model_dir), "configs/toy/base/finetune.yaml", [Method("ft"), Method("x", command="report")],
              RET, DOWN, output_dir=str(tmp_path / "s"))
    with pytest.raises(ValueError, match="baseline='ft' is not one of the methods"):
        study(str(tiny_model_dir), "configs/toy/base/finetune.yaml", [Method("plain")], RET, DOWN,
              output_dir=str(tmp_path / "s"))
    assert not (tmp_path / "s").exists()


def test_shipped_study_covers_every_method_of_the_comparison_soundly():
    """Every method, three seeds each, on the whole training split, with every replay source at one
    budget that no fit cycles (25%, drawn at 0.25 per task sequence, max_passes 2)."""
    config = yaml.safe_load((REPO / "configs/toy/study.yaml").read_text())
    names = [m["name"] for m in config["methods"]]
    assert names == ["ft", "lora", "l2", "ema", "cs", "real-replay", "cfs-nll", "cfs-kl", "cfs-kl-topk", "wise-ft"]
    data_side = yaml.safe_load((REPO / "configs/toy/study-data.yaml").read_text())
    assert [m["name"] for m in data_side["methods"]] == ["ft", "stm", "self-output", "self-dialogue"]
    assert data_side["output_dir"] == config["output_dir"] and data_side["fit_args"] == config["fit_args"]
    assert config["seeds"] == [0, 1, 2] and not any("seeds" in m for m in config["methods"])
    wise_ft = config["methods"][-1]
    assert wise_ft["command"] == "interpolate" and "--finetuned={runs.ft}/hf_model" in wise_ft["args"]
    assert "--data.init_args.task.split=train" in config["fit_args"]
    assert "--data.init_args.replay.max_passes=2" in config["fit_args"]
    train = sum(1 for _ in open(REPO / "data/gsm8k/train.jsonl"))
    budgets = {d["name"]: d["args"].get("budget.sequences") for d in config["data"]}
    assert budgets["cfs_25"] == budgets["cs"] == budgets["real"] == round(0.25 * train)
    replaying = [m for m in config["methods"] if m["name"] in ("cs", "real-replay", "cfs-nll", "cfs-kl", "cfs-kl-topk")]
    assert all("--data.init_args.replay_ratio=0.25" in m["args"] for m in replaying)


def test_the_progress_line_scales_the_estimates_by_the_pace_seen():
    from cfs_lightning.experiments.progress import Progress

    progress = Progress([1.0, 2.0, None])
    assert progress.rest(0) == pytest.approx(1 + 2 + 1.5)  # no estimate: the mean of the others
    progress.done(0, 2.0)  # this machine runs at half the expected speed
    assert progress.rest(1) == pytest.approx(2 * 2 + 2.0)
    assert progress.line(1, "cfs seed 0") == "[study] step 2/3: cfs seed 0; about 6 min to go"
    progress.done(1, 0.01)  # skipped as finished earlier: says nothing of the pace
    assert progress.rest(2) == pytest.approx(2.0)
    assert Progress([None]).line(0, "ft seed 0") == "[study] step 1/1: ft seed 0"
    # each kind keeps its own pace: a data step quicker than guessed does not shorten the fits
    mixed = Progress([2.0, 3.0, 3.0], ["data", "fit", "fit"])
    mixed.done(0, 0.5)
    assert mixed.rest(1) == pytest.approx(6.0)
    mixed.done(1, 4.5)
    assert mixed.rest(2) == pytest.approx(4.5)



def test_the_progress_line_leaves_out_runs_finished_earlier(tmp_path, monkeypatch):
    """A resumed study's estimate counts only the runs still to do: the finished ones are skipped."""
    from cfs_lightning.experiments.runs import mark_done
    from cfs_lightning.experiments.study import _run_all, _Step

    old, new = tmp_path / "ft" / "seed0", tmp_path / "ft" / "seed1"
    mark_done(old, 0.0, method="ft")
    lines = []
    monkeypatch.setattr(cfs_lightning.experiments.study, "rank_zero_info", lines.append)
    ran = []
    _run_all([_Step("ft seed 0", 4.0, "run", lambda: ran.append(0) or 0.0, folder=old),
              _Step("ft seed 1", 5.0, "run", lambda: ran.append(1) or 0.0, folder=new)])
    assert lines[0] == "[study] step 1/2: ft seed 0; about 5 min to go"  # not 9: seed 0 is done
    assert ran == [0, 1]  # the steps themselves decide to skip; the line only counts them


STUDIES = sorted(p.relative_to(REPO).as_posix() for p in [*REPO.glob("configs/toy*/*.yaml"), *REPO.glob("configs/real/*/*.yaml")]
                 if "methods:" in p.read_text())


@pytest.mark.parametrize("config", STUDIES)
def test_every_shipped_study_config_plans(config, monkeypatch, capsys):
    """Each shipped study parses, names files that exist and placeholders it defines, and states
    how long it takes; the plan runs nothing."""
    from cfs_lightning.commands import call, function

    monkeypatch.chdir(REPO)
    monkeypatch.setattr(cfs_lightning.experiments.study, "run_fit", lambda *a: pytest.fail("plan ran a fit"))
    plan = call(function("study"), ["--config", config, "--plan=true"])
    header = (REPO / config).read_text()
    assert plan["steps"] and plan["minutes"] > 0
    assert "minutes" in header.split("\nbase:")[0]  # the config says how long it takes
    assert "about" in capsys.readouterr().out
