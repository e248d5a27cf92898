"""`cfs study`: every method of a list, for every seed, against one base model and task; then
`cfs report` on the runs.

Layout under `output_dir`: `data/<name>/` (each data step's shards), `methods/<method>/seed<k>/`
(each fit's logs, `retained_eval.json` and export; `methods/<wise_ft.name>/seed<k>/wise_ft.json`
for WiSE-FT) and `report/` (the table and plots). The study is resumable: a fit that finished
(`study.json` written beside its logs) is skipped on a rerun, a fit that did not finish is run again
from the start, and the data steps are the resumable `cfs` data commands, which finish what is
missing and otherwise do nothing.
"""

from __future__ import annotations

import gc
import inspect
import json
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info

from ..checkpoints import RECORD, fetch as fetch_checkpoint
from ..commands import COMMANDS, function
from ..io import atomic_file
from .report import report
from .runner import run_command, run_fit
from .toy_base import ToyBase, build_base
from .wise_ft import AlphaSelection, interpolate

_PLACEHOLDER = re.compile(r"\{([\w.+-]+)\}")


@dataclass
class DataStep:
    """A data-side `cfs` command run once for the whole study (replay or rewritten task data)."""

    name: str
    """Folder under `<output_dir>/data/`; methods refer to it as `{data.<name>}`."""
    command: str
    """A data command of `cfs --help`, one that writes shards (`commands.COMMANDS`, `data=True`)."""
    config: str
    """The command's YAML config; its `base.model` (or `tokenizer`) and `output.dir` are the study's."""
    args: dict[str, Any] = field(default_factory=dict)
    """Fields of the config to replace, dotted (`budget.sequences: 64`)."""
    minutes: float | None = None
    """How long the step is expected to take, for the progress line's estimate of the rest."""


@dataclass
class Method:
    """One method: `cfs fit --config <fit_config> --config <configs...> <args...>` per seed."""

    name: str
    """Folder under `<output_dir>/methods/` and the method's name in the report."""
    configs: list[str] = field(default_factory=list)
    """Overlays laid over the study's `fit_config`, in order."""
    args: list[str] = field(default_factory=list)
    """`cfs fit` overrides (`--data.init_args.replay.dir={data.cfs}`); `{data.<name>}`, `{base}`
    and `{output_dir}` are replaced."""
    seeds: list[int] | None = None
    """Seeds of this method; default: the study's."""
    minutes: float | None = None
    """How long one fit is expected to take, for the progress line's estimate of the rest."""
    label: str | None = None
    """Its name in the report; default `name`. An ablation that shares a study's folder lists a
    method of that study under its own name and a label (`name: cfs-nll, label: nll@25`): the
    runs, finished with the same settings, are reused, not fitted again."""


@dataclass
class WiseFT:
    """WiSE-FT (arXiv 2109.01903): interpolations between the base and another method's exports."""

    tasks: list[str]
    """lm-eval task names or YAML files, as in the fits' `RetainedEval`."""
    select_on: AlphaSelection
    """Validation tasks and metrics the alpha is chosen on: documents the reported `tasks` never
    see (configs/tasks/*_val.yaml)."""
    finetuned: str = "ft"
    """The method whose export (`seed<k>/hf_model`) is interpolated, seed by seed."""
    name: str = "wise-ft"
    """Its name in the report; per seed, the report keeps the alpha with the most forgetting
    recovered plus gain kept on `select_on`, and gives its scores on `tasks`."""
    alphas: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    """Interpolation weights of the fine-tuned model; 0 and 1 are needed."""
    batch_size: int = 16
    """lm-eval batch size."""
    limit: int | float | None = None
    """Documents per task, as in the fits' `RetainedEval`."""


def _resolve(text: str, values: dict[str, str], where: str) -> str:
    def sub(m: re.Match) -> str:
        if m.group(1) not in values:
            raise KeyError(f"{where}: unknown placeholder {{{m.group(1)}}}; known: "
                           + ", ".join(f"{{{k}}}" for k in values))
        return values[m.group(1)]

    return _PLACEHOLDER.sub(sub, text)


@dataclass
class _Step:
    """One step of a study, in the order they run."""

    label: str
    minutes: float | None
    """Expected minutes (the config's estimate), for the progress line."""
    kind: str
    """base, data, fit or wise-ft: the progress line keeps a pace per kind."""
    run: Any
    """What does it; a fit's returns the minutes it took."""
    finished: Path | None = None
    """A fit's `study.json`: there when a rerun would skip it."""


def _plan(steps: list[_Step]) -> dict:
    """The steps a study would run, and the minutes they are expected to take (fits finished
    earlier, which a run would skip, count nothing)."""
    todo = []
    for i, step in enumerate(steps):
        done = step.finished is not None and step.finished.is_file()
        print(f"{i + 1:3d}. {step.label}" + (" (finished earlier)" if done else
                                              f" ({step.minutes:g} min)" if step.minutes is not None else ""))
        if not done:
            todo.append(step)
    total = Progress([s.minutes for s in todo], [s.kind for s in todo]).rest(0) if todo else 0.0
    if total is not None:
        print(f"about {total:.0f} minutes in all (on the machine the estimates were measured on)")
    return {"steps": [s.label for s in steps], "minutes": total}


def _run_data_step(step: DataStep, base: str, out: Path) -> None:
    fn = function(step.command)
    model_arg = "base.model" if "base" in inspect.signature(fn).parameters else "tokenizer"
    rank_zero_info(f"[study] data step {step.name}: cfs {step.command} -> {out}")
    run_command(fn, step.config, {model_arg: base, **step.args, "output.dir": str(out)})


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
    wise_ft: WiseFT | None = None,
    toy_base: ToyBase | None = None,
    fetch: str | None = None,
    baseline: str | None = "ft",
    report_dir: str | None = None,
    sweep_label: str | None = None,
    also: list[str] = [],  # noqa: B006
    plan: bool = False,
) -> dict:
    """Fit every method for every seed against one base model and task, then `cfs report` them.

    Seeds run in the outer loop, so a study stopped part-way has whole seeds of every method.

    Args:
        base: The base model (hub name or directory) every method starts from.
        fit_config: The `cfs fit` config every method shares (task, optimizer, schedule, a logger
            with a `save_dir`, and a `RetainedEval` callback measuring `retained` and `downstream`).
        methods: The methods; see `Method`.
        retained: `<task>/<metric>` of retained ability, as `RetainedEval` logs it.
        downstream: `<task>/<metric>` of the downstream task.
        output_dir: Where data, runs and the report go.
        seeds: `seed_everything` and the data module's seed (task order, replay order) of each
            fit; the data steps are run once, with their configs' seeds.
        fit_args: `cfs fit` overrides for every method, before the method's own (placeholders as
            in `Method.args`).
        data: Data steps run before any fit; see `DataStep`.
        wise_ft: WiSE-FT sweeps over another method's exports; None: none.
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
    names = [m.name for m in methods] + ([wise_ft.name] if wise_ft else [])
    labels = {m.name: m.label for m in methods if m.label is not None}
    shown = [labels.get(n, n) for n in names]
    if len(set(names)) != len(names) or len(set(shown)) != len(shown) or not names:
        raise ValueError(f"study: method names and labels must be unique and at least one; got {shown}")
    if wise_ft and wise_ft.finetuned not in names:
        raise ValueError(f"study: wise_ft.finetuned={wise_ft.finetuned!r} is not one of the methods {names}")
    if baseline is not None and baseline not in shown:
        raise ValueError(f"study: baseline={baseline!r} is not one of the methods {shown}")
    data_commands = [name for name, c in COMMANDS.items() if c.data]
    for step in data:
        if step.command not in data_commands:
            raise ValueError(f"data step {step.name!r}: unknown command {step.command!r}; one of {sorted(data_commands)}")
    named = [("fit_config", fit_config)] + [(f"method {m.name}", c) for m in methods for c in m.configs]
    missing = [f"{who}: {c}" for who, c in named + [(f"data step {s.name}", s.config) for s in data]
               if not Path(c).is_file()]
    if missing:
        raise FileNotFoundError("study: config files not found (paths are relative to the working "
                                "directory, the repository root for the shipped configs): " + "; ".join(missing))
    values = {"base": base, "output_dir": str(out)}
    values |= {f"data.{s.name}": str(out / "data" / s.name) for s in data}
    # every placeholder is checked before anything runs
    fit_args = [_resolve(a, values, "study fit_args") for a in fit_args]
    method_args = {m.name: [_resolve(a, values, f"method {m.name}") for a in m.args] for m in methods}
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
    steps += [_Step(f"data {s.name}", s.minutes, "data", lambda s=s: _run_data_step(s, base, out / "data" / s.name))
              for s in data]
    for seed in sorted({s for m in methods for s in (m.seeds or seeds)}):  # seeds in the outer loop
        for m in methods:
            if seed in (m.seeds or seeds):
                folder = out / "methods" / m.name
                steps.append(_Step(f"{m.name} seed {seed}", m.minutes, "fit", lambda m=m, seed=seed, folder=folder:
                                   _fit_once(m, seed, base, fit_config, fit_args + method_args[m.name], folder),
                                   folder / f"seed{seed}" / "study.json"))
        if wise_ft is not None and seed in (_method(methods, wise_ft.finetuned).seeds or seeds):
            steps.append(_Step(f"{wise_ft.name} seed {seed}", None, "wise-ft", lambda seed=seed: _interpolate_once(
                wise_ft, seed, base, retained, downstream, out / "methods")))
    if plan:
        return _plan(steps)
    start, timings = time.perf_counter(), {}
    progress = Progress([s.minutes for s in steps], [s.kind for s in steps])
    for i, step in enumerate(steps):
        rank_zero_info(progress.line(i, step.label))
        began = time.perf_counter()
        minutes = step.run()
        progress.done(i, (time.perf_counter() - began) / 60)
        if step.kind in ("fit", "wise-ft"):
            timings[step.label] = minutes
    total = (time.perf_counter() - start) / 60
    rank_zero_info(f"[study] {len(timings)} runs, {sum(timings.values()):.1f} minutes of run time "
                   f"(this call: {total:.1f} minutes)")
    return report([str(out / "methods" / n) for n in names if (out / "methods" / n).is_dir()],
                  retained, downstream, output_dir=report_dir or str(out / "report"), baseline=baseline,
                  sweep_label=sweep_label, labels=labels, also=also)


class Progress:
    """The study's progress line: which step runs and how long the rest should take.

    The rest is estimated from the steps' expected minutes (`DataStep.minutes`, `Method.minutes`),
    each kind of step (data, fit) scaled by how long the steps of that kind done in this call took
    against their estimates, so a slower machine sees its own pace; steps without an estimate count
    as the mean of those of their kind (or of any) done. A step skipped as finished earlier takes
    seconds and does not count.
    """

    def __init__(self, expected: list[float | None], kinds: list[str] | None = None) -> None:
        self.expected, self.took = expected, [None] * len(expected)
        self.kinds = kinds or ["step"] * len(expected)

    def done(self, i: int, minutes: float) -> None:
        if minutes > 0.05:  # a skipped step says nothing of the pace
            self.took[i] = minutes

    def _steps(self, kind: str | None = None) -> list[int]:
        return [j for j, k in enumerate(self.kinds) if kind is None or k == kind]

    def _pace(self, kind: str) -> float:
        timed = [j for j in self._steps(kind) if self.took[j] is not None and self.expected[j] is not None]
        return sum(self.took[j] for j in timed) / sum(self.expected[j] for j in timed) if timed else 1.0

    def _typical(self, kind: str) -> float | None:
        for steps in (self._steps(kind), self._steps()):
            done = [self.took[j] for j in steps if self.took[j] is not None]
            if done:
                return sum(done) / len(done)
            known = [self.expected[j] for j in steps if self.expected[j] is not None]
            if known:
                return self._pace(kind) * sum(known) / len(known)
        return None

    def rest(self, i: int) -> float | None:
        """Minutes expected for steps i.. (None before there is anything to go by)."""
        total = 0.0
        for j in range(i, len(self.expected)):
            kind = self.kinds[j]
            minutes = (self._pace(kind) * self.expected[j] if self.expected[j] is not None
                       else self._typical(kind))
            if minutes is None:
                return None
            total += minutes
        return total

    def line(self, i: int, label: str) -> str:
        rest = self.rest(i)
        eta = f"; about {rest:.0f} min to go" if rest is not None else ""
        return f"[study] step {i + 1}/{len(self.expected)}: {label}{eta}"


def _method(methods: list[Method], name: str) -> Method:
    return next(m for m in methods if m.name == name)


def _finished(run: Path, **record) -> float | None:
    """Minutes a finished run took (from its `study.json`); None when it did not finish. A run
    finished with other settings than `record` is refused, not mixed into the report."""
    done = run / "study.json"
    if not done.is_file():
        return None
    saved = json.loads(done.read_text())
    changed = [k for k, v in record.items() if saved.get(k) != v]
    if changed:
        raise ValueError(f"study: {run} was finished with other settings ({', '.join(changed)}: "
                         f"{saved.get(changed[0])!r}, now {record[changed[0]]!r}); delete that folder to "
                         "redo it with the new settings, or give the study another output_dir")
    return saved["minutes"]


def _mark_done(run: Path, started: float, **record) -> float:
    minutes = (time.perf_counter() - started) / 60
    with atomic_file(run / "study.json") as tmp:
        tmp.write_text(json.dumps({**record, "minutes": minutes}, indent=2) + "\n")
    return minutes


def _fit_once(method: Method, seed: int, base: str, fit_config: str, args: list[str], folder: Path) -> float:
    run = folder / f"seed{seed}"
    configs = [fit_config, *method.configs]
    overrides = [f"--model.init_args.pretrained={base}", f"--seed_everything={seed}",
                 f"--data.init_args.seed={seed}", *args,
                 f"--trainer.logger.init_args.save_dir={run}", f"--export.dirpath={run / 'hf_model'}"]
    if (minutes := _finished(run, configs=configs, args=overrides)) is not None:
        rank_zero_info(f"[study] {method.name} seed {seed}: finished earlier, skipped")
        return minutes
    if run.exists():  # an interrupted fit: start it again from nothing
        shutil.rmtree(run)
    rank_zero_info(f"[study] {method.name} seed {seed}")
    started = time.perf_counter()
    run_fit(configs, overrides)
    gc.collect()
    return _mark_done(run, started, method=method.name, seed=seed, configs=configs, args=overrides)


def _interpolate_once(w: WiseFT, seed: int, base: str, retained: str, downstream: str, methods: Path) -> float:
    run = methods / w.name / f"seed{seed}"
    finetuned = methods / w.finetuned / f"seed{seed}" / "hf_model"
    settings = {"finetuned": str(finetuned), "alphas": w.alphas, "select_on": asdict(w.select_on)}
    if (minutes := _finished(run, **settings)) is not None:
        return minutes
    started = time.perf_counter()
    rank_zero_info(f"[study] {w.name} seed {seed}: interpolating {base} and {finetuned}")
    interpolate(base, str(finetuned), w.tasks, retained, downstream, alphas=w.alphas, output_dir=str(run),
                batch_size=w.batch_size, limit=w.limit, device="auto", select_on=w.select_on)
    return _mark_done(run, started, method=w.name, seed=seed, **settings)
