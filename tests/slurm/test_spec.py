"""Sweep files: validation errors are one line naming the key; expansion is deterministic."""

from __future__ import annotations

import re

import pytest

from slurm.cli import main
from slurm.spec import Placement, SpecError, fairseq_command, job_spec, load

from .conftest import run_cli, tiny_sweep


def error_of(path, *overrides, **kw) -> str:
    with pytest.raises(SpecError) as info:
        load(path, list(overrides), **kw)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_malformed_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ngrid: {arch: [a, b}\n")
    assert "malformed YAML at line 2" in error_of(path)


def test_override_value_that_is_not_yaml(tmp_path, corpus):
    path = tiny_sweep(tmp_path / "s.yaml", corpus)
    message = error_of(path, "data.prepare={python} -m prep --out x")  # YAML reads '{python}' as a mapping
    assert "override 'data.prepare={python} -m prep --out x'" in message and "not valid YAML" in message
    assert "'data.prepare=\"...\"'" in message  # how to quote it
    sweep = load(path, ['data.prepare="{python} -m prep --out x"'])  # quoted: a string
    assert sweep.data_prepare == "{python} -m prep --out x"


def test_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    assert "mapping" in error_of(path)


def test_unknown_top_and_nested_keys(tmp_path, corpus):
    path = tiny_sweep(tmp_path / "s.yaml", corpus, gird={"arch": ["x"]})
    assert "unknown key 'gird'" in error_of(path)
    path = tiny_sweep(tmp_path / "s.yaml", corpus, resources__gpus=2)
    assert "unknown key 'resources.gpus'" in error_of(path)
    path = tiny_sweep(tmp_path / "s.yaml", corpus, budget__max_updates=3)
    assert "unknown key 'budget.max_updates'" in error_of(path)


def test_unknown_arch_checked_against_fairseq_registry(tmp_path, corpus):
    path = tiny_sweep(tmp_path / "s.yaml", corpus, grid={"arch": ["clustered_transformer", "clusterd_transformer"]})
    message = error_of(path)
    assert "key 'arch'" in message and "'clusterd_transformer'" in message
    load(tiny_sweep(tmp_path / "ok.yaml", corpus))  # the registered ones pass


def test_missing_data_without_prepare(tmp_path, corpus):
    path = tiny_sweep(tmp_path / "s.yaml", tmp_path / "nowhere")
    assert "key 'data.path'" in error_of(path)
    with_prepare = tiny_sweep(tmp_path / "p.yaml", tmp_path / "nowhere", data__prepare="true")
    load(with_prepare)  # it will be prepared at launch


def test_bad_values_name_their_key(tmp_path, corpus):
    assert "'budget'" in error_of(tiny_sweep(tmp_path / "a.yaml", corpus, budget={}))
    assert "'resources.nodes'" in error_of(tiny_sweep(tmp_path / "b.yaml", corpus, resources__nodes=0))
    assert "'fairseq.save_dir'" in error_of(tiny_sweep(tmp_path / "c.yaml", corpus, fairseq__save_dir="/x"))
    assert "'grid.clusters'" in error_of(tiny_sweep(tmp_path / "d.yaml", corpus, grid={"clusters": 4}))
    assert "'seeds'" in error_of(tiny_sweep(tmp_path / "e.yaml", corpus, seeds="one"))
    assert "missing key 'task'" in error_of(tiny_sweep(tmp_path / "f.yaml", corpus, task=None))


def test_dotlist_overrides_and_expansion(tmp_path, corpus):
    path = tiny_sweep(tmp_path / "s.yaml", corpus, arms=[{"name": "big", "encoder_layers": 2}, {"name": "small"}])
    sweep = load(path, ["model.clusters=6", "seeds=[1,2]", "budget.gpu_hours=0.5", "resources.gpus_per_node=2"],
                 check_arch=True)  # fmt: skip
    ids = [r.run_id for r in sweep.runs()]
    assert ids == ["big_softmax_s1", "big_softmax_s2", "big_clustered_s1", "big_clustered_s2",
                   "small_softmax_s1", "small_softmax_s2", "small_clustered_s1", "small_clustered_s2"]  # fmt: skip
    run = sweep.runs()[0]
    assert run.args["clusters"] == 6 and run.args["encoder_layers"] == 2 and run.attention == "softmax"
    argv = fairseq_command(job_spec(sweep, run))
    assert argv[argv.index("--clusters") + 1] == "6"
    assert argv[argv.index("--stop-time-hours") + 1] == "0.250000"  # 0.5 GPU-hours over 2 GPUs
    assert argv[argv.index("--seed") + 1] == "1" and "--cpu" in argv
    assert "unknown key 'modle'" in error_of(path, "modle.clusters=3")


def test_booleans_reach_fairseq_as_written(tmp_path, corpus):
    """The plugin's booleans take a value (false must not vanish); fairseq's flags stay bare."""
    path = tiny_sweep(tmp_path / "s.yaml", corpus, model={"clusters": 4, "hash_bias": False, "attention_stats": True})
    sweep = load(path)
    argv = fairseq_command(job_spec(sweep, sweep.runs()[0]))
    assert argv[argv.index("--hash-bias") + 1] == "false" and argv[argv.index("--attention-stats") + 1] == "true"
    assert "--cpu" in argv and argv[argv.index("--cpu") + 1].startswith("--"), argv  # store-true: no value
    hardmax = tiny_sweep(tmp_path / "h.yaml", corpus, grid={"arch": ["hardmax_pure_attention"]},
                         model={"train_alpha": False})  # fmt: skip
    sweep = load(hardmax)
    argv = fairseq_command(job_spec(sweep, sweep.runs()[0]))
    assert argv[argv.index("--train-alpha") + 1] == "false", argv


def test_cli_prints_one_line_error_and_exits_2(tmp_path, corpus, capsys):
    path = tiny_sweep(tmp_path / "s.yaml", corpus, resources__gpu=1)
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown key 'resources.gpu'" in err
    assert not (tmp_path / "sweeps").exists()  # nothing was created, let alone submitted


def test_trials_sample_configurations_reproducibly(tmp_path, corpus):
    # 2 architectures x 3 cluster counts = 6 configurations, 2 seeds each.
    path = tiny_sweep(tmp_path / "s.yaml", corpus, grid={"arch": ["softmax_transformer", "clustered_transformer"],
                                                         "clusters": [2, 4, 8]}, seeds=[1, 2])  # fmt: skip
    full = [r.run_id for r in load(path).runs()]
    assert len(full) == 12

    def ids(num, seed=0):
        return [r.run_id for r in load(path, [f"trials.num={num}", f"trials.seed={seed}"]).runs()]

    two = ids(2)
    assert len(two) == 4 and len({i.rsplit("_s", 1)[0] for i in two}) == 2  # 2 configurations, both seeds each
    assert ids(2) == two  # seeded: the same draw every time
    assert [i for i in full if i in two] == two  # ids and order are the full sweep's
    assert set(two) <= set(ids(4))  # more trials keep the earlier ones
    assert ids(-1) == full and ids(6) == full and ids(50) == full
    assert len({tuple(ids(2, seed)) for seed in range(8)}) > 1  # the seed changes the draw
    assert "'trials.num'" in error_of(path, "trials.num=0")
    assert "'trials.seed'" in error_of(path, "trials.seed=-3")


def test_arm_resources_override_and_split_job_groups(tmp_path, corpus):
    from slurm.backends import describe
    from slurm.launch import resource_groups

    path = tiny_sweep(tmp_path / "s.yaml", corpus, grid={"arch": ["softmax_transformer"]},
                      arms=[{"name": "wide", "resources": {"gpus_per_node": 2, "mem_gb": 8}}, {"name": "one"}],
                      budget={"gpu_hours": 1.0})  # fmt: skip
    sweep = load(path)
    wide, one = sweep.runs()
    assert wide.resources.gpus_per_node == 2 and wide.resources.mem_gb == 8
    assert one.resources == sweep.resources and one.resources.gpus_per_node == 0
    assert wide.resources.cpus_per_task == sweep.resources.cpus_per_task  # merged, not replaced
    groups = resource_groups(sweep.runs())
    assert [[r.run_id for r in runs] for _, runs in groups] == [["wide_softmax_s1"], ["one_softmax_s1"]]
    assert describe(groups[0][0]).startswith("1 node x 2 tasks, 2 GPU/node")
    argv = {r.run_id: fairseq_command(job_spec(sweep, r)) for r in sweep.runs()}
    hours = {k: float(v[v.index("--stop-time-hours") + 1]) for k, v in argv.items()}
    assert hours == {"wide_softmax_s1": 0.5, "one_softmax_s1": 1.0}  # equal GPU-hours per arm
    assert job_spec(sweep, wide).gpus == 2 and job_spec(sweep, one).gpus == 0
    bad = [({"gpu": 1}, "unknown key 'arms[0].resources.gpu'"), ({"parallel": 2}, "'arms[0].resources.parallel'"),
           ({"tasks_per_node": 0}, "'arms[0].resources.tasks_per_node'"), (3, "'arms[0].resources' must be a mapping")]
    for i, (resources, message) in enumerate(bad):
        assert message in error_of(tiny_sweep(tmp_path / f"b{i}.yaml", corpus, arms=[{"resources": resources}]))


def test_dry_run_shows_trials_and_job_arrays(tmp_path, corpus):
    path = tiny_sweep(tmp_path / "s.yaml", corpus, name="dry", grid={"arch": ["softmax_transformer", "clustered_transformer"],
                      "clusters": [2, 4]}, arms=[{"name": "a"}, {"name": "b", "resources": {"tasks_per_node": 2}}])  # fmt: skip
    # Dotlist overrides may come after options (as in the README's examples).
    args = ["run", str(path), "--cluster", "slurm", "--dry-run", "--num-trials", "3", "fairseq.lr=0.002", "--trials-seed", "5"]
    first, again = run_cli(args, timeout=120), run_cli(args, timeout=120)
    assert first.returncode == 0, first.stderr[-2000:]
    commands = [line for line in first.stdout.splitlines() if "fairseq-train" in line]
    assert len(commands) == 3 and commands == [line for line in again.stdout.splitlines() if "fairseq-train" in line]
    assert "trials: 3 of 8 configurations drawn with seed 5" in first.stdout
    chosen = [line.split()[0] for line in commands]
    headers = [line for line in first.stdout.splitlines() if line.startswith("# ")]
    arrays = {"a": "x 1 task,", "b": "x 2 tasks,"}
    assert len(headers) == len({c[0] for c in chosen})  # one job array per resource set drawn
    assert all(any(arrays[c[0]] in h for h in headers) for c in chosen)
    for line in commands:
        run_id = line.split()[0]
        assert f"/dry/{run_id}/checkpoints" in line and "--seed 1" in line and " --lr 0.002 " in line
    assert not (tmp_path / "sweeps" / "dry" / "jobs.json").exists()  # nothing launched
    status = run_cli(["status", str(path), "--num-trials", "3", "--trials-seed", "5"], timeout=120)
    listed = [line.split()[0] for line in status.stdout.splitlines()[2:] if line.strip() and not line.startswith("3 runs")]
    assert listed == chosen and "3 runs: 3 not started" in status.stdout


def test_one_function_builds_the_whole_command_distributed_flags_included(tmp_path, corpus):
    sweep = load(tiny_sweep(tmp_path / "s.yaml", corpus, grid={"arch": ["clustered_transformer"]},
                            model={"clusters": 4, "hash_bias": False}))  # fmt: skip
    job = job_spec(sweep, sweep.runs()[0])
    single = fairseq_command(job)
    assert single[0].endswith("fairseq-train") and single[1] == str(corpus) and "--distributed-world-size" not in single
    assert single[single.index("--hash-bias") + 1] == "false"
    rank = fairseq_command(job, Placement(world=4, rank=3, local_rank=1, init_method="tcp://node1:23456"))
    assert rank[: len(single)] == single  # the same run, then where this task sits
    assert rank[len(single):] == ["--distributed-world-size", "4", "--distributed-rank", "3", "--device-id", "1",
                                  "--distributed-init-method", "tcp://node1:23456", "--distributed-no-spawn",
                                  "--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp"]  # no GPUs: gloo
    gpus = load(tiny_sweep(tmp_path / "g.yaml", corpus, resources__gpus_per_node=2))
    on_gpus = fairseq_command(job_spec(gpus, gpus.runs()[0]), Placement(world=2, rank=1, local_rank=1, init_method="tcp://h:1"))
    assert "gloo" not in on_gpus and on_gpus[-1] == "--distributed-no-spawn"
    import pickle

    assert pickle.loads(pickle.dumps(job)) == job  # what submitit pickles (and requeues)


def test_the_hardmax_sweep_file_says_false_plainly_and_means_it():
    from .conftest import REPO

    path = REPO / "experiments" / "hardmax" / "sentiment.yaml"
    assert '"false"' not in path.read_text() and "'false'" not in path.read_text()
    sweep = load(path, check_data=False)
    fixed = next(r for r in sweep.runs() if r.arm.startswith("hardmax_alpha1"))
    trained = next(r for r in sweep.runs() if r.args["arch"] == "hardmax_pure_attention" and "train_alpha" not in r.args)
    argv = fairseq_command(job_spec(sweep, fixed))
    assert argv[argv.index("--train-alpha") + 1] == "false", argv
    assert "--train-alpha" not in fairseq_command(job_spec(sweep, trained))  # the default: alpha trained


def test_classification_is_pure(tmp_path, corpus):
    """classify() only looks at what it is given; Launch writes what the verdict says separately."""
    from pathlib import Path

    from slurm.launch import Ending, classify

    sweep = load(tiny_sweep(tmp_path / "s.yaml", corpus, grid={"arch": ["softmax_transformer"]}))
    run = sweep.runs()[0]
    log = Path("/nonexistent/train.log")
    done = classify(run, Ending("7", None, train_log=log), {"state": "finished", "updates": 8, "job_id": "7"}, {})
    assert (done.outcome.state, done.outcome.reason, done.record) == ("finished", "8 updates", None)
    failed = classify(run, Ending("7", "boom"), {"state": "failed", "exit_code": 2, "error": "a\nlast words", "job_id": "7"}, {})
    assert failed.outcome.reason == "fairseq-train exit 2: last words" and failed.record is None
    stale = {"state": "finished", "job_id": "6"}  # an earlier job's result: this job died without one
    killed = classify(run, Ending("7", "OOM", scheduler_state="OUT_OF_MEMORY", job_log=log), stale, {})
    assert killed.record == "failed" and "scheduler state OUT_OF_MEMORY" in killed.outcome.reason
    assert killed.outcome.log == log or killed.outcome.log is None
    asked = classify(run, Ending("7", "interrupted"), {"state": "running", "job_id": "7"}, {"cancelled_at": 1.0})
    assert asked.outcome.state == "cancelled" and asked.record == "cancelled"
    assert not sweep.dir.exists()  # nothing was written


def test_backends_are_chosen_once_by_name():
    from slurm.backends import BACKENDS, DebugBackend, LocalBackend, SlurmBackend, backend

    assert set(BACKENDS) == {"local", "slurm", "debug"}
    assert isinstance(backend("local"), LocalBackend) and isinstance(backend("debug"), DebugBackend)
    slurm = backend("slurm")
    assert isinstance(slurm, SlurmBackend) and slurm.detached and not backend("local").detached
    assert slurm.alive("RUNNING") and slurm.alive("PENDING (Resources)") and not slurm.alive("COMPLETED")
    assert slurm.alive("UNKNOWN", submitted=__import__("time").time()) and not slurm.alive("UNKNOWN", submitted=0.0)
    with pytest.raises(KeyError, match="unknown cluster 'pbs'"):
        backend("pbs")


def test_launcher_source_has_no_backend_string_branches():
    """Only slurm/backends.py turns a --cluster name into behaviour."""
    import re

    from .conftest import REPO

    pattern = re.compile(r"""(==|!=|\bin\b)\s*\(?\s*["'](local|slurm|debug)["']""")
    for path in (REPO / "slurm").glob("*.py"):
        if path.name != "backends.py":
            hits = [line for line in path.read_text().splitlines() if pattern.search(line)]
            assert not hits, (path.name, hits)


@pytest.mark.parametrize("args, expected", [
    (["run", "{bad}"], "malformed YAML at line 2, column"),
    (["run", "{good}", "--cluster", "pbs"], "argument --cluster: invalid choice: 'pbs'"),
    (["cancel", "{missing}"], "no such sweep file (give the path of a sweep YAML file"),
    (["status", "{missing}"], "no such sweep file"),
    (["launch", "{good}"], "argument command: invalid choice: 'launch'"),
    (["run", "{good}", "--nodes", "two"], "argument --nodes: invalid int value: 'two'"),
    (["run", "{good}", "resources"], "override 'resources': expected KEY=VALUE"),
])  # fmt: skip
def test_every_cli_error_is_one_line_naming_the_fix(tmp_path, corpus, args, expected):
    """The real fairseq-sweep (python -m slurm): exit 2, one line on stderr, no traceback, nothing written."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ngrid: {arch: [a, b}\n")
    names = {"bad": bad, "good": tiny_sweep(tmp_path / "s.yaml", corpus, name="err"), "missing": tmp_path / "nope.yaml"}
    proc = run_cli([a.format(**names) for a in args], timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("fairseq-sweep: error: ") and expected in line, line
    assert not (tmp_path / "sweeps").exists()


@pytest.mark.parametrize("command", ["run", "status", "cancel", "report"])
def test_a_root_that_cannot_be_a_directory_is_one_line(tmp_path, corpus, command):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    path = tiny_sweep(tmp_path / "s.yaml", corpus, name="blocked", root=str(blocker / "sweeps"))
    proc = run_cli([command, str(path)], timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stdout[-2000:] + proc.stderr[-2000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"fairseq-sweep: error: {blocker}") and "check the sweep file's 'root'" in line, line


def test_cancel_of_a_sweep_never_launched_says_so(tmp_path, corpus):
    proc = run_cli(["cancel", str(tiny_sweep(tmp_path / "s.yaml", corpus, name="never"))], timeout=120)
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr[-2000:]
    assert "nothing to cancel: no job of this sweep is queued or running" in proc.stdout


def test_status_shows_the_nodes_a_run_used_when_recorded(tmp_path, corpus):
    from slurm.runs import write_json

    path = tiny_sweep(tmp_path / "s.yaml", corpus, name="where")
    sweep = load(path, check_arch=False)
    first, second = sweep.runs()
    write_json(sweep.run_dir(first) / "result.json", {"state": "finished", "updates": 8})  # an older launcher's
    old = run_cli(["status", str(path)], timeout=120)
    assert old.returncode == 0 and "nodes" not in old.stdout.splitlines()[0], old.stdout
    write_json(sweep.run_dir(second) / "result.json", {"state": "finished", "updates": 8, "nodes": ["node1", "node2"]})
    new = run_cli(["status", str(path)], timeout=120)
    assert new.returncode == 0 and new.stdout.splitlines()[0].split()[-1] == "nodes", new.stdout
    assert re.search(rf"^{second.run_id}\s+finished\s+8\s.*node1,node2$", new.stdout, re.M), new.stdout


def test_a_job_pickled_by_the_older_launcher_runs_the_same_command(tmp_path, corpus):
    """Jobs submitted before JobSpec carried a dict (launch.job_spec's); a requeue after an upgrade
    unpickles one into today's TrainJob, which must run the very same command."""
    import pickle

    from slurm.job import TrainJob

    sweep = load(tiny_sweep(tmp_path / "s.yaml", corpus, grid={"arch": ["clustered_transformer"]},
                            budget={"gpu_hours": 1.0}, resources__tasks_per_node=2))  # fmt: skip
    run = sweep.runs()[0]
    new = job_spec(sweep, run)
    command = fairseq_command(new)
    old = {"run_id": run.run_id, "arm": run.arm, "seed": run.seed, "attention": run.attention, "args": run.args,
           "run_dir": str(new.run_dir), "fairseq_train": command[0], "argv": command[1:], "gpus": 0, "threads": 1,
           "resources": new.resources.of_job(), "metric": {"metric": "loss", "split": "valid", "lower_is_better": True}}
    job = TrainJob.__new__(TrainJob)
    job.__dict__["spec"] = old  # what such a pickle holds
    revived = pickle.loads(pickle.dumps(job))
    assert revived.spec.run_dir == new.run_dir and revived.spec.tb_dir == new.tb_dir and revived.spec.metric == new.metric
    place = Placement(world=2, rank=1, local_rank=1, init_method="tcp://127.0.0.1:2345")
    assert fairseq_command(revived.spec, place) == fairseq_command(new, place)
    assert fairseq_command(revived.spec) == command and revived.spec.resources == new.resources
