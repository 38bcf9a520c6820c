"""Sweep files: schema, validation and expansion into runs.

A sweep file is YAML read with OmegaConf (``${...}`` interpolation works; command-line dotlist
overrides such as ``model.clusters=200`` are merged before validation). Every problem is a
:class:`SpecError` whose message is one line naming the key, raised before anything runs.

    name: demo                       # the sweep's directory under root
    root: "{repo}/outputs/sweeps"    # default: outputs/sweeps (beside the sweep file)
    task: masked_lm
    data: {path: ..., prepare: "..."}  # prepare runs (shell) when path/dict.txt (or input0/dict.txt) is missing
    fairseq: {criterion: masked_lm, lr: 1e-3, cpu: true, ...}   # base args: key -> value
    model: {clusters: 16}            # more fairseq args, the usual place for overrides
    grid: {arch: [a, b], clusters: [8, 16]}                    # cartesian product
    arms: [{name: x, arch: a}, ...]  # explicit configurations (each crossed with the grid); an arm
                                     # may carry its own `resources: {tasks_per_node: 2}` (merged
                                     # over the sweep's; such arms go out as their own job array)
    seeds: [1, 2]
    resources: {gpus_per_node: 0, nodes: 1, tasks_per_node: 1, cpus_per_task: 1, mem_gb: 4,
                time_min: 60, partition: null, account: null, qos: null, constraint: null,
                signal_delay_s: 30, parallel: null}
    trials: {num: -1, seed: 0}       # fb_sweep's --num-trials: a seeded random subset of the
                                     # configurations (every seed of each), -1 = all
    budget: {max_update: 200, max_epoch: null, wall_minutes: null, gpu_hours: null}
    metric: {name: loss, split: valid, lower_is_better: true}

A sweep file means the same from any working directory. In ``root``, ``data.path`` and
``data.prepare``, ``{repo}`` is this repository's root (where ``experiments/`` lives) and
``{python}`` the interpreter running the launcher; any other relative path is relative to the
directory of the sweep file. ``data.prepare`` runs there, with the repository on ``PYTHONPATH``
(so ``{python} -m experiments.<module>`` works).

fairseq arguments are written with underscores or dashes (``max_tokens`` = ``max-tokens``);
``true`` becomes a bare flag, ``false``/``null`` drops it (the plugin's value-taking booleans are
written ``--hash-bias false``: :func:`fairseq_command`), a list becomes several values.
"""

from __future__ import annotations

import functools
import itertools
import random
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

TOP_KEYS = {"name", "root", "task", "data", "fairseq", "model", "grid", "arms", "seeds", "resources", "budget", "metric",
            "trials"}  # fmt: skip
REQUIRED = ("name", "task")
DATA_KEYS = {"path", "prepare"}
@dataclass(frozen=True)
class Resources:
    """What one job of a run asks the scheduler for (``resources:``, an arm's overrides merged in)."""

    gpus_per_node: int = 0
    nodes: int = 1
    tasks_per_node: int = 1  # CPU jobs: ranks per node; with GPUs it is gpus_per_node (one task per GPU)
    cpus_per_task: int = 1
    mem_gb: float = 4
    time_min: int = 60
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    signal_delay_s: int = 30
    parallel: int | None = None  # local/debug: jobs at a time (default: cores // cpus_per_task); SLURM schedules itself

    @property
    def tasks(self) -> int:
        """Tasks per node: one per GPU, else ``tasks_per_node`` CPU ranks."""
        return self.gpus_per_node or self.tasks_per_node

    @property
    def gpus(self) -> int:
        return self.gpus_per_node * self.nodes

    def of_job(self) -> dict[str, Any]:
        """As recorded in result.json (``parallel`` is the launcher's, not the job's)."""
        return {k: v for k, v in asdict(self).items() if k != "parallel"}


@dataclass(frozen=True)
class Budget:
    """When a run stops; ``wall_minutes`` and ``gpu_hours`` become ``--stop-time-hours``."""

    max_update: int | None = None
    max_epoch: int | None = None
    wall_minutes: float | None = None
    gpu_hours: float | None = None


@dataclass(frozen=True)
class Metric:
    """The metric that ``best``/``final`` and the report are about: fairseq's ``<split>_<name>``."""

    name: str = "loss"
    split: str = "valid"
    lower_is_better: bool = True

    @property
    def key(self) -> str:
        return f"{self.split}_{self.name}"


@dataclass(frozen=True)
class Trials:
    """fb_sweep's ``--num-trials``: ``num`` configurations drawn with ``seed``; -1 = every configuration."""

    num: int = -1
    seed: int = 0


def _defaults(cls: type) -> dict[str, Any]:
    return {f.name: f.default for f in fields(cls)}


RESOURCE_DEFAULTS = _defaults(Resources)  # the dataclasses are the one source of the defaults
BUDGET_DEFAULTS = _defaults(Budget)
METRIC_DEFAULTS = _defaults(Metric)
TRIALS_DEFAULTS = _defaults(Trials)
SWEEP_ONLY_RESOURCES = {"parallel"}  # launcher-wide, not per job: an arm cannot set it
# Arguments the launcher owns; setting them in the sweep would break resume or the run layout.
RESERVED = {"save_dir", "tensorboard_logdir", "user_dir", "task", "seed", "log_format", "distributed_world_size",
            "distributed_rank", "distributed_init_method", "device_id", "max_update", "max_epoch", "stop_time_hours"}  # fmt: skip
REPO = Path(__file__).resolve().parents[1]  # this repository (where experiments/ lives)
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.=-]*$")


class SpecError(ValueError):
    """A problem with a sweep file; the message is one line that names the key."""


@dataclass(frozen=True)
class Run:
    """One training run: a configuration (arm) and a seed."""

    run_id: str
    arm: str
    seed: int
    args: dict[str, Any]  # fairseq arguments (underscored keys) beyond the base ones
    resources: Resources = Resources()  # the sweep's, with the arm's overrides

    @property
    def attention(self) -> str:
        arch = str(self.args.get("arch", ""))
        explicit = self.args.get("attention_type")
        if explicit:
            return str(explicit)
        for kind in ("i_clustered", "clustered", "hardmax", "softmax"):
            if arch.startswith(kind):
                return kind
        return arch or "default"


@dataclass
class Sweep:
    name: str
    root: Path
    task: str
    data_path: Path | None
    data_prepare: str | None
    base: dict[str, Any]
    grid: dict[str, list[Any]]
    arms: list[tuple[dict[str, Any], dict[str, Any]]]  # (fairseq args + optional "__name__", resource overrides)
    seeds: list[int]
    resources: Resources
    budget: Budget
    metric: Metric
    trials: Trials = Trials()
    source: Path | None = None
    config: dict[str, Any] = field(default_factory=dict)  # the resolved file, for the record

    @property
    def dir(self) -> Path:
        return self.root / self.name

    def run_dir(self, run: Run) -> Path:
        return self.dir / run.run_id

    def tb_dir(self, run: Run) -> Path:
        return self.dir / "tb" / run.run_id

    def runs(self) -> list[Run]:
        """The runs this sweep launches, reports and cancels: every run, or the sampled trials."""
        return sample(expand(self), self.trials.num, self.trials.seed)


def data_ready(path: Path) -> bool:
    """A binarised fairseq data directory: its dictionary at the top (masked_lm, speech_to_text) or,
    for sentence_prediction, in input0/."""
    return any((path / name).is_file() for name in ("dict.txt", "input0/dict.txt"))


def _norm(key: str) -> str:
    return str(key).replace("-", "_")


def _plain(node: Any) -> Any:
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


def load(path: str | Path, overrides: Sequence[str] = (), check_arch: bool = True, check_data: bool = True) -> Sweep:
    """Read, override, validate and return a sweep; raises :class:`SpecError` (one line)."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such sweep file (give the path of a sweep YAML file, e.g. experiments/demo.yaml)")
    text = path.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise SpecError(f"{path}: malformed YAML{where}: {problem}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a sweep file is a mapping of keys (name, task, ...), got {type(raw).__name__}")
    try:
        cfg: DictConfig | ListConfig = OmegaConf.create(raw)
        for item in overrides:
            if "=" not in item:
                raise SpecError(f"override {item!r}: expected KEY=VALUE (an OmegaConf dotlist item)")
            key, value = item.lstrip("+").split("=", 1)
            if key.split(".")[0] not in TOP_KEYS:
                raise SpecError(f"override {item!r}: unknown key {key.split('.')[0]!r} (known: {', '.join(sorted(TOP_KEYS))})")
            try:  # the value is YAML: say which one does not parse, and how to quote it
                yaml.safe_load(value)
            except yaml.YAMLError as err:
                problem = getattr(err, "problem", None) or str(err).splitlines()[0]
                raise SpecError(f"override {item!r}: the value is not valid YAML ({problem}); quote it for YAML "
                                f"inside the shell's quotes, e.g. '{key}=\"...\"'") from None  # fmt: skip
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([o.lstrip("+") for o in overrides]))
        data = OmegaConf.to_container(cfg, resolve=True)
        assert isinstance(data, dict)  # merged over a mapping
    except OmegaConfBaseException as err:
        first = str(err).strip().splitlines()[0]
        full_key = getattr(err, "full_key", None)
        raise SpecError(f"{path}: {('key ' + repr(full_key) + ': ') if full_key else ''}{first}") from None
    return validate({str(k): v for k, v in data.items()}, source=path, check_arch=check_arch, check_data=check_data)



def sweep_dir(source: Path | None) -> Path:
    """The directory that a sweep file's relative paths (and ``data.prepare``) start from."""
    return Path(source).resolve().parent if source is not None else Path.cwd()


def placeholders(text: str, *, quote: bool = False) -> str:
    """``{repo}`` and ``{python}`` filled in (shell-quoted for a command when ``quote``)."""
    import shlex
    import sys

    fill = shlex.quote if quote else str
    return text.replace("{repo}", fill(str(REPO))).replace("{python}", fill(sys.executable))


def _path(value: Any, base: Path) -> Path:
    return (base / Path(placeholders(str(value))).expanduser()).resolve()


def _mapping(data: dict[str, Any], key: str, known: set[str] | None, src: str) -> dict[str, Any]:
    value = data.get(key) or {}
    if not isinstance(value, dict):
        raise SpecError(f"{src}: key {key!r} must be a mapping, got {type(value).__name__}")
    if known is not None:
        for sub in value:
            if sub not in known:
                raise SpecError(f"{src}: unknown key '{key}.{sub}' (known: {', '.join(sorted(known))})")
    return value


def _check_args(args: dict[str, Any], where: str, src: str) -> dict[str, Any]:
    out = {}
    for key, value in args.items():
        norm = _norm(key)
        if norm in RESERVED:
            raise SpecError(f"{src}: key '{where}.{key}' is set by the launcher (use budget/seeds/task instead)")
        if isinstance(value, dict):
            raise SpecError(f"{src}: key '{where}.{key}' must be a scalar or a list, got a mapping")
        out[norm] = value
    return out


def validate(data: dict[str, Any], source: Path | None = None, check_arch: bool = True, check_data: bool = True) -> Sweep:
    src = str(source) if source else "sweep"
    for key in data:
        if key not in TOP_KEYS:
            raise SpecError(f"{src}: unknown key {key!r} (known: {', '.join(sorted(TOP_KEYS))})")
    for key in REQUIRED:
        if not data.get(key):
            raise SpecError(f"{src}: missing key {key!r}")
    name = str(data["name"])
    if not SAFE_NAME.match(name):
        raise SpecError(f"{src}: key 'name' must be a plain directory name, got {name!r}")

    dat = _mapping(data, "data", DATA_KEYS, src)
    base = _check_args(_mapping(data, "fairseq", None, src), "fairseq", src)
    base.update(_check_args(_mapping(data, "model", None, src), "model", src))

    grid = {}
    for key, values in _mapping(data, "grid", None, src).items():
        if _norm(key) in RESERVED:
            raise SpecError(f"{src}: key 'grid.{key}' is set by the launcher")
        if not isinstance(values, list) or not values:
            raise SpecError(f"{src}: key 'grid.{key}' must be a non-empty list of values")
        grid[_norm(key)] = values

    arms = data.get("arms") or []
    if not isinstance(arms, list):
        raise SpecError(f"{src}: key 'arms' must be a list of mappings")
    checked_arms = []
    for i, arm in enumerate(arms):
        if not isinstance(arm, dict):
            raise SpecError(f"{src}: key 'arms[{i}]' must be a mapping of fairseq arguments")
        arm = dict(arm)
        label = arm.pop("name", None)
        if label is not None and not SAFE_NAME.match(str(label)):
            raise SpecError(f"{src}: key 'arms[{i}].name' must be a plain directory name, got {label!r}")
        own = arm.pop("resources", None) or {}
        if not isinstance(own, dict):
            raise SpecError(f"{src}: key 'arms[{i}].resources' must be a mapping, got {type(own).__name__}")
        for key in own:
            if key in SWEEP_ONLY_RESOURCES:
                raise SpecError(f"{src}: key 'arms[{i}].resources.{key}' is launcher-wide; set it in 'resources'")
            if key not in RESOURCE_DEFAULTS:
                raise SpecError(f"{src}: unknown key 'arms[{i}].resources.{key}' "
                                f"(known: {', '.join(sorted(set(RESOURCE_DEFAULTS) - SWEEP_ONLY_RESOURCES))})")  # fmt: skip
        args = _check_args(arm, f"arms[{i}]", src)
        if label is not None:
            args["__name__"] = str(label)
        checked_arms.append((args, own))

    seeds = data.get("seeds", [1])
    if isinstance(seeds, int):
        seeds = [seeds]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise SpecError(f"{src}: key 'seeds' must be a non-empty list of integers")

    resources = {**RESOURCE_DEFAULTS, **_mapping(data, "resources", set(RESOURCE_DEFAULTS), src)}
    if resources["parallel"] is not None and (not isinstance(resources["parallel"], int) or resources["parallel"] < 1):
        raise SpecError(f"{src}: key 'resources.parallel' must be a positive integer or null, got {resources['parallel']!r}")
    _check_resources(resources, "resources", src)
    for i, (_, own) in enumerate(checked_arms):
        _check_resources({**resources, **own}, f"arms[{i}].resources", src)
    budget = {**BUDGET_DEFAULTS, **_mapping(data, "budget", set(BUDGET_DEFAULTS), src)}
    for key, value in budget.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
            raise SpecError(f"{src}: key 'budget.{key}' must be a positive number or null, got {value!r}")
    if all(v is None for v in budget.values()):
        raise SpecError(f"{src}: key 'budget' must set at least one of {', '.join(BUDGET_DEFAULTS)} (an unbounded run never ends)")
    metric = {**METRIC_DEFAULTS, **_mapping(data, "metric", set(METRIC_DEFAULTS), src)}
    if not isinstance(metric["lower_is_better"], bool):
        raise SpecError(f"{src}: key 'metric.lower_is_better' must be true or false")
    trials = {**TRIALS_DEFAULTS, **_mapping(data, "trials", set(TRIALS_DEFAULTS), src)}
    for key, low in (("num", -1), ("seed", 0)):
        value = trials[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < low or (key == "num" and value == 0):
            what = "a positive integer or -1 (all)" if key == "num" else "an integer >= 0"
            raise SpecError(f"{src}: key 'trials.{key}' must be {what}, got {value!r}")

    here = sweep_dir(source)
    root = _path(data.get("root") or "outputs/sweeps", here)
    data_path = _path(dat["path"], here) if dat.get("path") else None
    sweep = Sweep(
        name=name, root=root, task=str(data["task"]), data_path=data_path, data_prepare=dat.get("prepare"),
        base=base, grid=grid, arms=checked_arms, seeds=list(seeds), resources=Resources(**resources),
        budget=Budget(**budget), metric=Metric(**metric), trials=Trials(**trials), source=source, config=data,
    )  # fmt: skip
    runs = expand(sweep)
    if not runs:
        raise SpecError(f"{src}: the sweep expands to no runs")
    ids = [r.run_id for r in runs]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise SpecError(f"{src}: key 'arms': two runs share the id {dup!r}; give the arms distinct names")
    if check_arch:
        _check_archs(runs, src)
    if check_data and data_path is None:
        raise SpecError(f"{src}: missing key 'data.path'")
    if check_data and data_path is not None and not data_ready(data_path) and not sweep.data_prepare:
        raise SpecError(f"{src}: key 'data.path': {data_path} has no dict.txt and 'data.prepare' is not set")
    return sweep


def _check_resources(resources: dict[str, Any], where: str, src: str) -> None:
    for key in ("gpus_per_node", "nodes", "tasks_per_node", "cpus_per_task", "time_min", "signal_delay_s"):
        value = resources[key]
        low = 0 if key in ("gpus_per_node", "signal_delay_s") else 1
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise SpecError(f"{src}: key '{where}.{key}' must be an integer >= {low}, got {value!r}")
    if not isinstance(resources["mem_gb"], (int, float)) or isinstance(resources["mem_gb"], bool) or resources["mem_gb"] <= 0:
        raise SpecError(f"{src}: key '{where}.mem_gb' must be a positive number, got {resources['mem_gb']!r}")


def _check_archs(runs: list[Run], src: str) -> None:
    known = registered_archs()
    for run in runs:
        arch = run.args.get("arch")
        if arch is None:
            raise SpecError(f"{src}: run {run.run_id!r} has no 'arch' (set it in fairseq, model, grid or arms)")
        if arch not in known:
            close = [a for a in known if a.split("_")[0] in str(arch)][:4]
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise SpecError(f"{src}: key 'arch': unknown fairseq architecture {arch!r}{hint}")


def registered_archs() -> set[str]:
    """fairseq's ARCH_MODEL_REGISTRY after importing the plugin (what ``--arch`` accepts)."""
    import sys

    import fairseq_plugin

    try:
        from fairseq.models import ARCH_MODEL_REGISTRY
    except ImportError as err:
        raise SpecError(f"fairseq is not importable by {sys.executable} ({err}); run fairseq-sweep from the "
                        "environment that has it (bash scripts/setup.sh makes .venv)") from None  # fmt: skip

    fairseq_plugin.register()
    return set(ARCH_MODEL_REGISTRY)


def _short(value: Any) -> str:
    text = str(value)
    for prefix in ("transformer",):
        text = text.replace(f"_{prefix}", "")
    return re.sub(r"[^A-Za-z0-9_.-]", "", text.replace(" ", ""))[:40] or "x"


def expand(sweep: Sweep) -> list[Run]:
    """arms x grid x seeds, in file order; run ids name what varies (fb_sweep's save_dir_key)."""
    arms = sweep.arms or [({}, {})]
    keys = list(sweep.grid)
    combos = list(itertools.product(*(sweep.grid[k] for k in keys))) or [()]
    configs = []
    for arm, own in arms:
        for combo in combos:
            args = {**sweep.base, **{k: v for k, v in arm.items() if k != "__name__"}, **dict(zip(keys, combo))}
            label = arm.get("__name__")
            parts = [label] if label else []
            parts += [f"{k}{_short(v)}" if k != "arch" else _short(v) for k, v in zip(keys, combo)]
            configs.append(("_".join(parts) or "base", args, replace(sweep.resources, **own)))
    runs = []
    for arm_id, args, resources in configs:
        for seed in sweep.seeds:
            runs.append(Run(run_id=f"{arm_id}_s{seed}", arm=arm_id, seed=seed, args=args, resources=resources))
    return runs


def sample(runs: list[Run], num: int, seed: int) -> list[Run]:
    """fb_sweep's ``--num-trials``: ``num`` configurations (arms) drawn at random, with all their seeds.

    The draw is a seeded shuffle of the configurations, cut after ``num``: the same (num, seed) gives
    the same runs, a larger ``num`` keeps the smaller draw's runs and adds to them, and run ids are the
    full sweep's ids (sampling never renames a run). -1, or ``num`` >= the configurations, is all.
    """
    arms = list(dict.fromkeys(run.arm for run in runs))  # file order
    if num < 0 or num >= len(arms):
        return runs
    order = list(arms)
    random.Random(seed).shuffle(order)
    chosen = set(order[:num])
    return [run for run in runs if run.arm in chosen]


@functools.lru_cache(maxsize=None)
def value_booleans(arch: str | None) -> frozenset[str]:
    """The options of ``arch``'s model that take ``true`` / ``false`` as a value (the plugin's
    ``--hash-bias``, ``--attention-stats``, ``--train-alpha``), found by asking the model's own
    argparse options; fairseq's store-true flags (``--cpu``) are not among them."""
    import argparse

    registered_archs()  # the plugin registered (or a one-line SpecError without fairseq)
    from fairseq.models import ARCH_MODEL_REGISTRY

    model = ARCH_MODEL_REGISTRY.get(arch) if arch else None
    if model is None or not hasattr(model, "add_args"):
        return frozenset()
    parser = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    model.add_args(parser)
    names = set()
    for action in parser._actions:
        if action.nargs is None and callable(action.type) and action.option_strings:
            try:
                if action.type("true") is True and action.type("false") is False:
                    names.add(action.dest)
            except (ValueError, TypeError, argparse.ArgumentTypeError):
                pass
    return frozenset(names)


@dataclass(frozen=True)
class JobSpec:
    """Everything a submitted job needs, as plain picklable data (what :class:`slurm.job.TrainJob`
    carries through submitit's pickle and every requeue)."""

    run_id: str
    arm: str
    seed: int
    attention: str
    args: dict[str, Any]  # the run's fairseq arguments (underscored keys), as in the sweep file
    run_dir: Path
    tb_dir: Path
    data_path: Path
    task: str
    budget: Budget
    resources: Resources
    metric: Metric
    value_booleans: frozenset[str] = frozenset()  # of ``args``: written --flag true|false (see value_booleans)
    fairseq_train: str = "fairseq-train"
    user_dir: Path = REPO / "fairseq_plugin"
    legacy_argv: tuple[str, ...] | None = None  # a job pickled before JobSpec: its run's arguments as built then

    @classmethod
    def from_legacy(cls, spec: Mapping[str, Any]) -> JobSpec:
        """A job pickled by a launcher from before JobSpec (a dict holding the run's ``argv``), read
        as one: a job submitted before an upgrade and requeued after it runs the same command."""
        argv = tuple(str(a) for a in spec["argv"])

        def after(flag: str, default: str) -> str:
            return argv[argv.index(flag) + 1] if flag in argv[:-1] else default

        metric = spec.get("metric") or {}
        resources = {k: v for k, v in (spec.get("resources") or {}).items() if k in RESOURCE_DEFAULTS}
        return cls(
            run_id=spec["run_id"], arm=spec["arm"], seed=spec["seed"], attention=spec["attention"], args=dict(spec["args"]),
            run_dir=Path(spec["run_dir"]), tb_dir=Path(after("--tensorboard-logdir", spec["run_dir"])),
            data_path=Path(argv[0]), task=after("--task", ""), budget=Budget(), resources=Resources(**resources),
            metric=Metric(metric.get("metric", "loss"), metric.get("split", "valid"), metric.get("lower_is_better", True)),
            fairseq_train=spec["fairseq_train"], legacy_argv=argv,
        )  # fmt: skip

    @property
    def gpus(self) -> int:
        return self.resources.gpus

    @property
    def threads(self) -> int:
        return self.resources.cpus_per_task


@dataclass(frozen=True)
class Placement:
    """Where one task of a job sits in its distributed world (a world of 1: not distributed)."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0
    init_method: str | None = None  # tcp://MASTER:PORT when world > 1


def job_spec(sweep: Sweep, run: Run) -> JobSpec:
    """The job of one run (asks fairseq which of its options are value-taking booleans)."""
    if sweep.data_path is None:
        raise SpecError(f"{sweep.source or 'sweep'}: missing key 'data.path'")
    return JobSpec(
        run_id=run.run_id, arm=run.arm, seed=run.seed, attention=run.attention, args=dict(run.args),
        run_dir=sweep.run_dir(run), tb_dir=sweep.tb_dir(run), data_path=sweep.data_path, task=sweep.task,
        budget=sweep.budget, resources=run.resources, metric=sweep.metric,
        value_booleans=value_booleans(run.args.get("arch")), fairseq_train=fairseq_train_path(),
    )  # fmt: skip


def fairseq_train_path() -> str:
    """The ``fairseq-train`` beside this Python (a venv's), else the one on PATH."""
    import sys

    exe = Path(sys.executable).parent / "fairseq-train"
    return str(exe) if exe.is_file() else "fairseq-train"


def fairseq_command(job: JobSpec, place: Placement = Placement()) -> list[str]:
    """The whole ``fairseq-train`` command line of one task: the program, the run's options, the
    budget, the launcher's own arguments and, in a world of more than one, the distributed flags.

    A boolean is ``--flag true|false`` for an option that takes a value (``job.value_booleans``:
    the plugin's ``--hash-bias``), else fairseq's bare store-true flag (present when true, absent
    when false); ``null`` drops the option; a list becomes several values."""
    argv = [job.fairseq_train, *(_run_argv(job) if job.legacy_argv is None else job.legacy_argv)]
    if place.world > 1:  # one task per GPU (or per CPU rank with gloo); fairseq is told, not left to guess
        argv += ["--distributed-world-size", str(place.world), "--distributed-rank", str(place.rank),
                 "--device-id", str(place.local_rank), "--distributed-init-method", str(place.init_method),
                 "--distributed-no-spawn"]  # fmt: skip
        if not job.gpus:
            argv += ["--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp"]
    return argv


def _run_argv(job: JobSpec) -> list[str]:
    """The run's part of :func:`fairseq_command`: data, task, its options, budget, launcher-owned paths."""
    argv = [str(job.data_path), "--task", job.task, "--user-dir", str(job.user_dir)]
    for key, value in job.args.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool) and key in job.value_booleans:
            argv += [flag, str(value).lower()]
        elif value is None or value is False:
            continue
        elif value is True:
            argv.append(flag)
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    budget = job.budget
    if budget.max_update:
        argv += ["--max-update", str(int(budget.max_update))]
    if budget.max_epoch:
        argv += ["--max-epoch", str(int(budget.max_epoch))]
    hours = []
    if budget.wall_minutes:
        hours.append(budget.wall_minutes / 60)
    if budget.gpu_hours:
        hours.append(budget.gpu_hours / max(1, job.gpus))  # equal GPU-hours: fewer GPUs train longer
    if hours:
        argv += ["--stop-time-hours", f"{min(hours):.6f}"]  # fairseq counts it across restarts
    argv += ["--seed", str(job.seed), "--save-dir", str(job.run_dir / "checkpoints"), "--tensorboard-logdir",
             str(job.tb_dir), "--log-format", "json"]  # fmt: skip
    return argv
