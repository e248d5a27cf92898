"""`cfs study`: every method of a list, for every seed, against one base model and task; then
`cfs report` on the runs.

Layout under `output_dir`: `data/<name>/` (each data step's shards), `methods/<method>/seed<k>/`
(each run: a fit's logs, scores and export, or another command's output) and `report/` (the table
and plots). The study is resumable: a run that finished (`done.json` written in its folder,
`runs.mark_done`) is skipped on a rerun, a run that did not finish is run again from the start,
and the data steps are the resumable `cfs` data commands, which finish what is missing and
otherwise do nothing.
"""

from __future__ import annotations

import gc
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info

from ..checkpoints import RECORD, fetch as fetch_checkpoint
from ..commands import overrides
from .progress import Progress
from .report import report
from .runner import run_fit
from .runs import finished, mark_done
from .steps import DataStep, check_step_command, run_step
from .toy_base import ToyBase, build_base

_PLACEHOLDER = re.compile(r"\{([\w.+-]+)\}")


@dataclass
class Method:
    """One method: per seed, `cfs fit --config <fit_config> --config <configs...> <args...>`, or
    another command (`command`) that writes a run into the seed's folder."""

    name: str
    """Folder under `<output_dir>/methods/` and the method's name in the report."""
    configs: list[str] = field(default_factory=list)
    """Overlays laid over the study's `fit_config`, in order (another command: its configs)."""
    args: list[str] = field(default_factory=list)
    """Overrides (`--data.init_args.replay.dir={data.cfs}`). Placeholders: `{base}`,
    `{output_dir}`, `{data.<name>}`, `{seed}`, and `{runs.<method>}`, the seed's run folder of a
    method listed earlier (`--finetuned={runs.ft}/hf_model`)."""
    seeds: list[int] | None = None
    """Seeds of this method; default: the study's."""
    minutes: float | None = None
    """How long one run is expected to take, for the progress line's estimate of the rest."""
    label: str | None = None
    """Its name in the report; default `name`. An ablation that shares a study's folder lists a
    method of that study under its own name and a label (`name: cfs-nll, label: nll@25`): the
    runs, finished with the same settings, are reused, not fitted again."""
    command: str = "fit"
    """`fit`, or a command that writes a run's scores into its output folder: `interpolate`
    (WiSE-FT of another method's exports: configs/toy/interpolate.yaml), run on the study's
    `base` into the seed's folder."""


def _resolve(text: str, values: dict[str, str], where: str) -> str:
    def sub(m: re.Match) -> str:
        if m.group(1) not in values:
            raise KeyError(f"{where}: unknown placeholder {{{m.group(1)}}}; known here: "
                           + ", ".join(f"{{{k}}}" for k in values)
                           + " ({runs.<method>} names a method listed earlier that runs this seed)")
        return values[m.group(1)]

    return _PLACEHOLDER.sub(sub, text)


@dataclass
class _Step:
    """One step of a study, in the order they run."""

    label: str
    minutes: float | None
    """Expected minutes (the config's estimate), for the progress line."""
    kind: str
    """base, data or run: the progress line keeps a pace per kind."""
    run: Callable[[], Any]
    """What does it; a run's returns the minutes it took."""
    folder: Path | None = None
    """A run's folder: finished when it holds `done.json`."""

    @property
    def done(self) -> bool:
        """A run that finished earlier, which the study skips."""
        return self.folder is not None and finished(self.folder) is not None

    @property
    def expected(self) -> float | None:
        """Minutes to expect for the progress line: none for a run that finished earlier."""
        return 0.0 if self.done else self.minutes


def _plan(steps: list[_Step]) -> dict:
    """The steps a study would run, and the minutes they are expected to take (runs finished
    earlier, which a study would skip, count nothing)."""
    todo = []
    for i, step in enumerate(steps):
        done = step.done  # reads the run's done.json: once per step
        print(f"{i + 1:3d}. {step.label}" + (" (finished earlier)" if done else
                                              f" ({step.minutes:g} min)" if step.minutes is not None else ""))
        if not done:
            todo.append(step)
    total = Progress([s.minutes for s in todo], [s.kind for s in todo]).rest(0) if todo else 0.0
    if total is not None:
        print(f"about {total:.0f} minutes in all (on the machine the estimates were measured on)")
    return {"steps": [s.label for s in steps], "minutes": total}


def _check(methods: list[Method], data: list[DataStep], fit_config: str, baseline: str | None) -> dict[str, str]:
    """Refuse a study that cannot run, before anything runs; the methods' shown names."""
    names = [m.name for m in methods]
    labels = {m.name: m.label for m in methods if m.label is not None}
    shown = [labels.get(n, n) for n in names]
    if len(set(names)) != len(names) or len(set(shown)) != len(shown) or not names:
        raise ValueError(f"study: method names and labels must be unique and at least one; got {shown}")
    if baseline is not None and baseline not in shown:
        raise ValueError(f"study: baseline={baseline!r} is not one of the methods {shown}")
    for step in data:
        check_step_command(step.command, f"data step {step.name!r}", data=True)
    for m in methods:
        if m.command != "fit":
            check_step_command(m.command, f"method {m.name!r}")
    named = [("fit_config", fit_config)] + [(f"method {m.name}", c) for m in methods for c in m.configs]
    missing = [f"{who}: {c}" for who, c in named + [(f"data step {s.name}", s.config) for s in data]
               if not Path(c).is_file()]
    if missing:
        raise FileNotFoundError("study: config files not found (paths are relative to the working "
                                "directory, the repository root for the shipped configs): " + "; ".join(missing))
    return labels


def _base_steps(base: str, toy_base: ToyBase | None, fetch: str | None) -> list[_Step]:
    """Building the toy base or fetching a real checkpoint into `base`, where it is not there."""
    steps = []
    if toy_base is not None and not (Path(base) / "config.json").is_file():
        steps.append(_Step(f"build the toy base model into {base}", toy_base.minutes, "base",
                           lambda: build_base(base, toy_base.init_config, toy_base.pretrain_config)))
    if fetch is not None:
        if Path(base).expanduser().name != fetch:
            raise ValueError(f"study: base {base!r} is not the cache folder of checkpoint {fetch!r}; "
                             f"use <cache>/{fetch}, e.g. ~/.cache/cfs_lightning/models/{fetch}")
        if not (Path(base).expanduser() / RECORD).is_file():
            steps.append(_Step(f"fetch {fetch} into {base}", 1, "base", lambda: fetch_checkpoint(
                fetch, str(Path(base).expanduser().parent))))
    return steps


def _run_steps(methods: list[Method], seeds: list[int], values: dict[str, str], base: str, fit_config: str,
               fit_args: list[str], methods_dir: Path) -> list[_Step]:
    """Every method's run per seed, seeds in the outer loop (a study stopped part-way has whole
    seeds of every method); every placeholder is resolved (and checked) here."""
    steps = []
    for seed in sorted({s for m in methods for s in (m.seeds or seeds)}):
        here = {**values, "seed": str(seed)}
        for m in methods:
            if seed not in (m.seeds or seeds):
                continue
            run = methods_dir / m.name / f"seed{seed}"
            args = [_resolve(a, here, f"method {m.name}") for a in m.args]
            if m.command == "fit":
                args = [f"--model.init_args.pretrained={base}", f"--seed_everything={seed}",
                        f"--data.init_args.seed={seed}", *(_resolve(a, here, "study fit_args") for a in fit_args),
                        *args, f"--trainer.logger.init_args.save_dir={run}", f"--export.dirpath={run / 'hf_model'}"]
            configs = [fit_config, *m.configs] if m.command == "fit" else m.configs
            # the paths it reads from earlier runs (`--finetuned={runs.ft}/hf_model`)
            reads = [_resolve(a, here, f"method {m.name}").split("=", 1)[-1] for a in m.args if "{runs." in a]
            steps.append(_Step(f"{m.name} seed {seed}", m.minutes, "run",
                               lambda m=m, c=configs, a=args, r=run, n=reads: _run_once(m, c, a, base, r, n), run))
            here[f"runs.{m.name}"] = str(run)
    return steps


def _run_once(method: Method, configs: list[str], args: list[str], base: str, run: Path,
              reads: list[str]) -> float:
    """One run of a method, unless it finished earlier with the same settings; its minutes."""
    if (record := finished(run, configs=configs, args=args)) is not None:
        rank_zero_info(f"[study] {run}: finished earlier, skipped")
        return record["minutes"]
    if missing := [p for p in reads if not Path(p).exists()]:
        raise FileNotFoundError(
            f"study: {method.name} ({run}) reads {', '.join(missing)}, which is not there: the run that "
            "writes it finished without it (on another machine: a study's committed records keep no "
            "models); delete that run's folder so that the study fits it again")
    if run.exists():  # an interrupted run: start it again from nothing
        shutil.rmtree(run)
    started = time.perf_counter()
    if method.command == "fit":
        run_fit(configs, args)
        gc.collect()
    else:
        run_step(method.command, configs, base, run, args)
    return mark_done(run, started, method=method.name, configs=configs, args=args)["minutes"]


def study(
    base: str,
    fit_config: str,
    methods: list[Method],
    retained: str,
    downstream: str,
    output_dir: str = "runs/study",
    seeds: list[int] = [0],  # noqa: B006 (jsonargparse default)
    fit_args: list[str] = [],  # noqa: B006
    data: list[DataStep] = [],  # noqa: B006
    toy_base: ToyBase | None = None,
    fetch: str | None = None,
    baseline: str | None = "ft",
    report_dir: str | None = None,
    sweep_label: str | None = None,
    also: list[str] = [],  # noqa: B006
    plan: bool = False,
) -> dict:
    """Run every method for every seed against one base model and task, then `cfs report` them.

    Args:
        base: The base model (hub name or directory) every method starts from.
        fit_config: The `cfs fit` config every fit shares (task, optimizer, schedule, a logger
            with a `save_dir`, and a `RetainedEval` callback measuring `retained` and `downstream`).
        methods: The methods; see `Method`.
        retained: `<task>/<metric>` of retained ability, as `RetainedEval` logs it.
        downstream: `<task>/<metric>` of the downstream task.
        output_dir: Where data, runs and the report go.
        seeds: `seed_everything` and the data module's seed (task order, replay order) of each
            fit; the data steps are run once, with their configs' seeds.
        fit_args: `cfs fit` overrides for every fit, before the method's own (placeholders as
            in `Method.args`).
        data: Data steps run before any method; see `DataStep`.
        toy_base: Build the toy base model into `base` when it does not exist; None: `base` must exist.
        fetch: A checkpoint `cfs fetch` knows (e.g. `smollm2-135m-instruct`), fetched into `base`
            when it is not there; `base` is then that checkpoint's cache folder (`<cache>/<name>`).
        baseline: The method the report measures forgetting recovered and gain kept against.
        report_dir: Where `cfs report` writes; default `<output_dir>/report`.
        sweep_label: For an ablation with methods named `<series>@<value>`: what the value is
            (the x-axis of the report's `sweep.png`).
        also: Further `<task>/<metric>`s the report tabulates (`cfs report --also`).
        plan: Check the study and print its steps with their expected minutes, running nothing.
    """
    out = Path(output_dir)
    labels = _check(methods, data, fit_config, baseline)
    values = {"base": base, "output_dir": str(out), **{f"data.{s.name}": str(out / "data" / s.name) for s in data}}
    steps = _base_steps(base, toy_base, fetch) + [
        _Step(f"data {s.name}", s.minutes, "data", lambda s=s: run_step(
            s.command, [s.config], base, out / "data" / s.name, [_resolve(a, values, f"data step {s.name}")
                                                                 for a in overrides(s.args)])) for s in data]
    steps += _run_steps(methods, seeds, values, base, fit_config, fit_args, out / "methods")
    if plan:
        return _plan(steps)
    _run_all(steps)
    return report([str(out / "methods" / m.name) for m in methods if (out / "methods" / m.name).is_dir()],
                  retained, downstream, output_dir=report_dir or str(out / "report"), baseline=baseline,
                  sweep_label=sweep_label, labels=labels, also=also)


def _run_all(steps: list[_Step]) -> None:
    """Run the steps in order, saying which runs and how long the rest should take."""
    start, timings = time.perf_counter(), {}
    progress = Progress([s.expected for s in steps], [s.kind for s in steps])
    for i, step in enumerate(steps):
        rank_zero_info(progress.line(i, step.label))
        began = time.perf_counter()
        minutes = step.run()
        progress.done(i, (time.perf_counter() - began) / 60)
        if step.kind == "run":
            timings[step.label] = minutes
    rank_zero_info(f"[study] {len(timings)} runs, {sum(timings.values()):.1f} minutes of run time "
                   f"(this call: {(time.perf_counter() - start) / 60:.1f} minutes)")
