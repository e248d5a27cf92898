import csv
import json
import math
from pathlib import Path

import pytest

from cfs_lightning.experiments.report import report
from cfs_lightning.experiments.runs import find_runs, load_run, method_and_seed
from cfs_lightning.experiments.wise_ft import AlphaSelection, choose_alpha, run_scores
from cfs_lightning.scores import write_scores

RET, DOWN = "held/bits_per_byte", "task/acc"  # retained lower-is-better, downstream higher-is-better
VAL_RET, VAL_DOWN = "held_val/bits_per_byte", "task_val/acc"  # WiSE-FT's alpha is chosen on these


def _fit_run(folder: Path, finals: list[tuple[float, float]], replay_nll: list[float], base=(2.0, 0.1),
             json_history: bool = True, meter: list[float] | None = None) -> None:
    """A run as RetainedEval + CSVLogger leave it: the start evaluation, then one per epoch."""
    folder.mkdir(parents=True)
    history, rows = [], []
    for i, (ret, down) in enumerate([base] + finals):
        step = 10 * i
        entry = {"epoch": max(i - 1, 0), "step": step, f"eval/{RET}": ret, f"eval/{DOWN}": down,
                 f"forget/{RET}": ret - base[0], f"forget/{DOWN}": -(down - base[1])}
        history.append(entry)
        rows.append({k: v for k, v in entry.items() if k != "epoch"})
        if i:
            rows.append({"epoch": i - 1, "step": step - 1, "train/loss": 1.0})
            rows.append({"epoch": i - 1, "step": step, "val/replay_nll": replay_nll[i - 1],
                         **({"val/replay_kl": meter[i - 1]} if meter else {})})
    if json_history:
        write_scores(folder, history)
    keys = sorted({k for r in rows for k in r})
    with (folder / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, keys)
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "methods"
    _fit_run(root / "ft" / "seed0", [(2.8, 0.5), (3.0, 0.7)], [3.0, 3.5])
    _fit_run(root / "ft" / "seed1", [(2.8, 0.5), (3.2, 0.5)], [3.1, 3.6])
    _fit_run(root / "cfs" / "seed0", [(2.1, 0.5), (2.2, 0.6)], [2.2, 2.3])
    _fit_run(root / "cfs" / "seed1", [(2.1, 0.5), (2.4, 0.6)], [2.2, 2.4], json_history=False)  # CSV only
    wise = root / "wise-ft" / "seed0"
    wise.mkdir(parents=True)
    # (alpha, test retained, test downstream, validation retained, validation downstream): on the
    # test scores 0.5 would be best, on the validation ones 0.75 is
    sweep = [(0.0, 2.0, 0.1, 2.0, 0.1), (0.5, 2.3, 0.55, 2.5, 0.3), (0.75, 2.9, 0.58, 2.6, 0.6),
             (1.0, 3.1, 0.6, 3.1, 0.6)]
    select_on = AlphaSelection(["held_val.yaml", "task_val.yaml"], VAL_RET, VAL_DOWN)
    rows = [{"alpha": a, RET: r, DOWN: d, VAL_RET: vr, VAL_DOWN: vd} for a, r, d, vr, vd in sweep]
    better = {RET: False, DOWN: True, VAL_RET: False, VAL_DOWN: True}
    write_scores(wise, run_scores(rows, choose_alpha(rows, select_on, better), select_on, better))
    (wise / "wise_ft.json").write_text(json.dumps({"rows": rows}))
    return root


def test_runs_are_found_and_grouped_by_method_and_seed(runs, tmp_path):
    found = find_runs([str(runs)])
    assert [method_and_seed(p) for p in found] == [
        ("cfs", "seed0"), ("cfs", "seed1"), ("ft", "seed0"), ("ft", "seed1"), ("wise-ft", "seed0")]
    assert method_and_seed(tmp_path / "lora" / "lightning_logs" / "version_3") == ("lora", "version_3")
    csv_only = load_run(runs / "cfs" / "seed1")  # epochs read from the training rows' epoch column
    assert csv_only.epochs == [0.0, 1.0, 2.0]
    assert [e[RET] for e in csv_only.evals] == [2.0, 2.1, 2.4]
    assert csv_only.curves["val/replay_nll"] == [(1.0, 2.2), (2.0, 2.4)]


def test_table_means_ratios_and_best_alpha(runs, tmp_path):
    s = report([str(runs)], RET, DOWN, output_dir=str(tmp_path / "out"), baseline="ft")
    assert s["higher_is_better"] == {RET: False, DOWN: True}  # read from the forget/ signs
    ft, cfs, wise = (s["methods"][m] for m in ("ft", "cfs", "wise-ft"))
    assert ft["retained"] == pytest.approx(3.1) and ft["retained_std"] == pytest.approx(math.sqrt(0.02))
    assert ft["downstream"] == pytest.approx(0.6)
    # forgetting recovered per seed against the ft mean (F_ft = 1.1): (1.1 - 0.2)/1.1, (1.1 - 0.4)/1.1
    assert cfs["forgetting_recovered"] == pytest.approx((0.9 / 1.1 + 0.7 / 1.1) / 2)
    assert cfs["gain_kept"] == pytest.approx(1.0)  # (0.6 - 0.1) / (0.6 - 0.1)
    assert ft["forgetting_recovered"] == pytest.approx(0.0)
    # on the validation scores, against the sweep's own ends, alpha 0.75 recovers (3.1-2.6)/1.1 = 0.45
    # and keeps 0.5/0.5 = 1: more than 0.5 (0.55 + 0.4); on the test scores 0.5 would win (0.73 + 0.9
    # against 0.18 + 0.96). The row reports alpha 0.75's test scores.
    assert wise["alpha"] == [0.75] and wise["retained"] == pytest.approx(2.9)
    assert wise["downstream"] == pytest.approx(0.58) and wise["alpha_chosen_on"] == [VAL_RET, VAL_DOWN]
    table = (tmp_path / "out" / "results.md").read_text()
    # two seeds that agree still show their spread (± 0); one seed shows none
    assert "| cfs | 2 | 2.3000 ± 0.1414 | 0.6000 ± 0.0000 |" in table
    assert "| wise-ft (α = 0.75) | 1 | 2.9000 | 0.5800 |" in table
    assert f"α is chosen per seed, by the same forgetting recovered + gain kept, on validation documents" in table
    assert "| base model | - | 2.0000 | 0.1000 | 100% | 0% |" in table  # no forgetting, no gain
    for name in ("tradeoff.png", "curves.png", "recovered.png"):
        data = (tmp_path / "out" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
        assert f"({name})" in table
    assert json.loads((tmp_path / "out" / "results.json").read_text())["methods"]["cfs"]["seeds"] == 2


def test_a_fit_with_only_its_start_evaluation_is_left_out_and_named(runs, tmp_path):
    _fit_run(runs / "ft" / "seed2", [], [])  # still running: the base model's scores alone
    s = report([str(runs)], RET, DOWN, output_dir=str(tmp_path / "out"), baseline="ft")
    assert s["methods"]["ft"]["seeds"] == 2 and s["methods"]["ft"]["retained"] == pytest.approx(3.1)
    assert s["unfinished"] == [str(runs / "ft" / "seed2")]
    assert f"Left out, unfinished (only their fit-start evaluation is logged): `{runs / 'ft' / 'seed2'}`" in (
        tmp_path / "out" / "results.md").read_text()
    with pytest.raises(ValueError, match="every run found is unfinished"):
        report([str(runs / "ft" / "seed2")], RET, DOWN, output_dir=str(tmp_path / "out2"), baseline="ft")


def test_tensorboard_logs_are_read(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    folder = tmp_path / "tb" / "lightning_logs" / "version_0"
    writer = SummaryWriter(str(folder))
    for step, ret, down in ((0, 2.0, 0.1), (20, 2.5, 0.4)):
        writer.add_scalar(f"eval/{RET}", ret, step)
        writer.add_scalar(f"eval/{DOWN}", down, step)
        writer.add_scalar(f"forget/{RET}", ret - 2.0, step)
    writer.add_scalar("epoch", 0, 19)
    writer.add_scalar("val/replay_nll", 3.3, 20)
    writer.close()
    run = load_run(find_runs([str(tmp_path / "tb")])[0])
    assert run.method == "tb" and run.epochs == [0.0, 1.0]
    assert run.evals[-1] == pytest.approx({RET: 2.5, DOWN: 0.4})
    assert run.curves["val/replay_nll"] == [(1.0, pytest.approx(3.3))]


def test_bad_input_is_named(runs, tmp_path):
    with pytest.raises(ValueError, match="baseline method 'plain' is not among the runs"):
        report([str(runs)], RET, DOWN, output_dir=str(tmp_path / "o1"), baseline="plain")
    with pytest.raises(KeyError, match="logged no 'task/f1'"):
        report([str(runs)], RET, "task/f1", output_dir=str(tmp_path / "o2"), higher_is_better=["task/f1"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no run logs in or under"):
        report([str(tmp_path / "empty")], RET, DOWN, output_dir=str(tmp_path / "o3"))
    assert not (tmp_path / "o1").exists() or not any((tmp_path / "o1").iterdir())
    rows = [{"alpha": a, VAL_RET: 1.0, VAL_DOWN: 1.0} for a in (0.0, 0.5)]  # no fine-tuned end
    with pytest.raises(ValueError, match="needs alphas 0 and 1 in the sweep; it has \\[0.0, 0.5\\]"):
        choose_alpha(rows, AlphaSelection([], VAL_RET, VAL_DOWN), {VAL_RET: False, VAL_DOWN: True})


def test_cfs_report_command_takes_one_folder_or_a_list(runs, tmp_path):
    from cfs_lightning.cli import main

    main(["report", "--runs", str(runs), f"--retained={RET}", f"--downstream={DOWN}",
          f"--output_dir={tmp_path / 'one'}"])
    main(["report", "--runs", f"[{runs / 'ft'}, {runs / 'cfs'}]", f"--retained={RET}", f"--downstream={DOWN}",
          f"--output_dir={tmp_path / 'two'}"])
    one = json.loads((tmp_path / "one" / "results.json").read_text())["methods"]
    two = json.loads((tmp_path / "two" / "results.json").read_text())["methods"]
    assert list(one) == ["cfs", "ft", "wise-ft"] and list(two) == ["ft", "cfs"]
    assert two["cfs"] == one["cfs"]


def test_report_files_get_the_umask_mode_not_mkstemps_0600(runs, tmp_path):
    import os

    umask = os.umask(0o022)
    try:
        report([str(runs)], RET, DOWN, output_dir=str(tmp_path / "out"))
    finally:
        os.umask(umask)
    for name in ("results.md", "results.json", "tradeoff.png"):
        assert (tmp_path / "out" / name).stat().st_mode & 0o777 == 0o644


def test_an_ablation_named_series_at_value_gets_its_sweep_plot(runs, tmp_path):
    for name, ret in (("nll@10", 2.9), ("nll@100", 2.3), ("kl@10", 2.6)):
        _fit_run(runs / name / "seed0", [(2.5, 0.5), (ret, 0.6)], [2.2, 2.3])
    s = report(str(runs), RET, DOWN, output_dir=str(tmp_path / "r"), sweep_label="replay budget (%)",
               labels={"cfs": "nll@50"})  # another study's runs shown as one of the points
    assert "sweep.png" in s["plots"] and (tmp_path / "r" / "sweep.png").stat().st_size > 0
    assert "cfs" not in s["methods"] and s["methods"]["nll@50"]["seeds"] == 2
    # more replay, less forgetting: the plotted points are the table's
    assert s["methods"]["nll@100"]["forgetting_recovered"] > s["methods"]["nll@10"]["forgetting_recovered"]
    plain = report(str(tmp_path / "methods" / "ft"), RET, DOWN, output_dir=str(tmp_path / "p"))
    assert "sweep.png" not in plain["plots"]



def test_the_forgetting_meter_is_plotted_against_retained_with_its_correlation(runs, tmp_path):
    # runs that drift further from the base (larger KL) retain less: the meter predicts forgetting
    for name, kl, ret in (("ft-meter", 0.9, 3.1), ("mid", 0.5, 2.6), ("kl", 0.1, 2.1)):
        _fit_run(runs / name / "seed0", [(2.5, 0.5), (ret, 0.6)], [2.2, 2.3], meter=[kl / 2, kl])
    s = report(str(runs), RET, DOWN, output_dir=str(tmp_path / "r"))
    m = s["meter"]["val/replay_kl"]
    assert sorted(p[:2] for p in m["points"]) == [[0.1, 2.1], [0.5, 2.6], [0.9, 3.1]]  # the last value
    assert m["pearson_r"] == pytest.approx(1.0)
    assert "val/task_kl" not in s["meter"]
    assert "meter.png" in s["plots"] and (tmp_path / "r" / "meter.png").stat().st_size > 0
    assert "over 3 runs of 3 methods: Pearson r = 1.00" in (tmp_path / "r" / "results.md").read_text()
    plain = report(str(runs / "ft"), RET, DOWN, output_dir=str(tmp_path / "p"))
    assert plain["meter"] == {} and "meter.png" not in plain["plots"]
    for seed, (kl, ret) in enumerate(((0.9, 3.1), (0.5, 2.6), (0.1, 2.1))):  # one method's seeds only
        _fit_run(tmp_path / "one" / "kl" / f"seed{seed}", [(2.5, 0.5), (ret, 0.6)], [2.2, 2.3], meter=[kl / 2, kl])
    _fit_run(tmp_path / "one" / "ft" / "seed0", [(2.5, 0.5), (3.1, 0.6)], [2.2, 2.3])
    alone = report(str(tmp_path / "one"), RET, DOWN, output_dir=str(tmp_path / "o"))
    assert alone["meter"]["val/replay_kl"]["pearson_r"] is None  # a correlation of one method's seeds
    assert "over 3 runs of 1 method: Pearson r = n/a" in (tmp_path / "o" / "results.md").read_text()


def test_also_tabulates_further_metrics_and_the_baselines_change_against_its_spread(runs, tmp_path):
    s = report([str(runs)], RET, DOWN, output_dir=str(tmp_path / "out"), baseline="ft", also=[RET, DOWN])
    held = s["also"][RET]
    assert held["base"] == pytest.approx(2.0)
    assert held["methods"]["ft"] == pytest.approx((3.1, math.sqrt(0.02)))
    assert held["methods"]["wise-ft"] == pytest.approx((2.9, 0.0))  # the chosen alpha's scores
    assert held["change_in_std"] == pytest.approx(1.1 / math.sqrt(0.02))  # ft rose 1.1 over a 0.14 spread
    assert s["also"][DOWN]["change_in_std"] == pytest.approx(0.5 / math.sqrt(0.02))
    table = (tmp_path / "out" / "results.md").read_text()
    assert f"| method | {RET} | {DOWN} |" in table and "| ft | 3.1000 ± 0.1414 | 0.6000 ± 0.1414 |" in table
    assert f"ft's change from the base model, in standard deviations of its seeds: {RET} 7.8, {DOWN} 3.5." in table
    with pytest.raises(KeyError, match="'held/acc' \\(in `also`\\) was not logged"):
        report([str(runs)], RET, DOWN, output_dir=str(tmp_path / "out2"), also=["held/acc"])


def test_per_item_forgetting_is_tabulated_for_the_runs_that_logged_it(runs, tmp_path):
    """Each run's last evaluation's `items/` keys, per method over the seeds that have them; a run
    without them (logged before per-item scoring) is left out of that table only."""
    for seed, (lost, gained) in (("seed0", (0.10, 0.02)), ("seed1", (0.20, 0.04))):
        path = runs / "ft" / seed
        history = json.loads((path / "retained_eval.json").read_text())
        history[-1] |= {"items/task/acc/forgotten": lost, "items/task/acc/gained": gained,
                        "items/task/acc/forgotten_adjusted": lost / 2, "items/task/acc/gained_adjusted": 0.0}
        write_scores(path, history)
    s = report([str(runs)], RET, DOWN, output_dir=str(tmp_path / "out"), baseline="ft")
    assert s["items"]["task/acc/forgotten"] == {"ft": pytest.approx([0.15, math.sqrt(0.005), 2])}
    assert set(s["methods"]) == {"ft", "cfs", "wise-ft"}  # the main table keeps every method
    table = (tmp_path / "out" / "results.md").read_text()
    assert "| method | task/acc |" in table and "| ft | 15 ± 7 / 3 ± 1 (8 ± 4 / 0 ± 0), 2 runs |" in table
