"""Shared test setup: no model hub, one CPU thread, deterministic Hypothesis; the tiny LM,
helpers, and the tiny runs that several test modules read (trained once per session)."""
import json
import multiprocessing
import os
import shutil

# transformers reads this at import time: with it, a missing model fails at once instead of after
# ~25 s of network retries (measured here). Set before anything imports transformers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One thread per process, set before torch is imported (subprocesses inherit it). The tiny models
# are far too small to gain from two threads, and when another process holds a core, OpenMP's
# spinning threads make every op ~15x slower (a 2-step run: 1.4 s with one thread, 21 s with two,
# at load 5 on 2 cores).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

import dpg_min as dm  # noqa: E402

# CI profile: derandomised so a run is reproducible, and no deadline because torch's first call of
# each kernel is slow. HYPOTHESIS_PROFILE=dev gives more, random examples for local hunting.
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=50, print_blob=True)
settings.register_profile("dev", deadline=None, max_examples=200)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# A tiny-model run small enough for a fraction of a second (fields not named keep the Config
# defaults).
SMALL = dict(model="tiny", batch_size=16, forward_batch_size=16, seq_len=8, steps=2,
             eval_interval=1, eval_samples=16, diversity_samples=16, lambda_samples=1024,
             q_update_interval=1, lr=1e-3, warmup=0, classifier="tiny")

# The four methods of §4.3 on `politics` (base rate ~18% at T = 10), 10 steps: enough for each to
# raise E_π φ.
METHOD_RUNS = dict(
    gdc=dict(method="dpg", baseline=False),
    gdcpp=dict(method="dpg", baseline=True),
    reinforce=dict(method="reinforce", baseline=True),
    ziegler=dict(method="ziegler", baseline=False),
)
METHOD_SETTINGS = dict(task="politics", batch_size=64, forward_batch_size=64, seq_len=10, steps=10,
                       lr=3e-3, eval_interval=10, eval_samples=256, q_update_interval=5,
                       ppo_minibatch=32, grad_var_interval=10, grad_var_samples=32)


def _read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _files_of(folder):
    """{relative path: bytes} of every file under folder, to show that nothing was changed."""
    return {os.path.relpath(os.path.join(d, n), folder): open(os.path.join(d, n), "rb").read()
            for d, _, names in os.walk(folder) for n in names}


@pytest.fixture(scope="session")
def lm():
    """The tiny original LM a and its tokenizer, built once (train() copies a, never changes it)."""
    return dm.load_lm("tiny")


@pytest.fixture(scope="session")
def read_metrics():
    """read_metrics(out): the rows of OUT/metrics.jsonl."""
    return _read_metrics


@pytest.fixture(scope="session")
def files_of():
    """files_of(folder): {relative path: bytes} of every file under it."""
    return _files_of


@pytest.fixture(scope="session")
def without_seconds():
    """without_seconds(rows): metrics rows minus wall-clock times (`seconds`, `seconds_*`,
    `samples_per_second`), the fields that may differ between equal runs."""
    def without_seconds(rows):
        return [{k: v for k, v in row.items() if k not in dm.TIMES} for row in rows]
    return without_seconds


@pytest.fixture(scope="session")
def run_tiny(lm):
    """run_tiny(cfg, log=None, ckpt=None) -> (π, last metrics, log lines): dm.train in-process on
    the tiny a."""
    def run(cfg, log=None, ckpt=None):
        lines = []

        def keep_and_log(line):
            lines.append(line)
            if log:
                log(line)

        pi, m = dm.train(cfg, dm.load_task(cfg), *lm, ckpt, log=keep_and_log)
        return pi, m, lines
    return run


@pytest.fixture
def small_config(tmp_path):
    """small_config(name="run", **changes): a dm.Config of a SMALL tiny run writing to
    tmp_path/name."""
    def make(name="run", **changes):
        return dm.Config(**{**SMALL, "out": str(tmp_path / name), **changes})
    return make


@pytest.fixture(scope="session")
def method_runs(run_tiny, tmp_path_factory):
    """{gdc, gdcpp, reinforce, ziegler: dict(cfg, out, pi, m, lines)}: each method trained once for
    the session. Tests that read them must not write into their folders (copy them first)."""
    root = tmp_path_factory.mktemp("methods")
    runs = {}
    for name, method in METHOD_RUNS.items():
        cfg = dm.Config(**{**SMALL, **METHOD_SETTINGS, **method, "out": str(root / name)})
        pi, m, lines = run_tiny(cfg)
        runs[name] = dict(cfg=cfg, out=cfg.out, pi=pi, m=m, lines=lines)
    return runs


@pytest.fixture(scope="session")
def children():
    """multiprocessing's forkserver context, for a run in a real process of its own (to kill for
    real): forked from a server that imported dpg_min and the tiny model's modules once, a child
    starts in ~0.5 s where a new interpreter spends ~5 s importing them (measured here). A target
    must be importable: dpg_min's, or a test module's (the child imports that module)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["dpg_min", "tokenizers",
                                    "transformers.models.gpt2.modeling_gpt2"])
    return context


@pytest.fixture
def copy_run(tmp_path):
    """copy_run(out, name): a copy of a run folder under tmp_path, to change without touching the
    original."""
    def copy(out, name="copy"):
        return shutil.copytree(out, tmp_path / name)
    return copy


# pytest-xdist (pyproject.toml: `-n auto`) runs the suite on every core. Tests that share an
# expensive fixture run in one worker, so that it is built once: each module of SHARED is one unit
# of work, test_plot's and test_training's tests together (the session's method_runs), every other
# test a unit of its own. The shared units start first, the longest first (seconds on 2 cores), so
# that the workers end together. (xdist's own `--dist loadgroup` marks are lost under pytest 9.2,
# whose nodes no longer read `_nodeid`: a group of ours, by module, needs no marks.)
SHARED = {"test_real_lm.py": "smollm2", "test_plot.py": "method_runs",
          "test_training.py": "method_runs", "test_distributed.py": "torchrun"}
LONGEST_FIRST = ["smollm2", "method_runs", "torchrun"]     # ~70, ~60, ~40 s


def shared_unit(nodeid):
    """The unit of work of the test nodeid: its SHARED group, or None."""
    return SHARED.get(os.path.basename(nodeid.partition("::")[0]))


def start_of(item):
    """Where item's unit starts: the longest shared units first, then the other tests."""
    unit = shared_unit(item.nodeid)
    return LONGEST_FIRST.index(unit) if unit else len(LONGEST_FIRST)


def pytest_collection_modifyitems(items):
    items.sort(key=start_of)


def pytest_xdist_make_scheduler(config, log):
    from xdist.scheduler import LoadScopeScheduling

    class SharedUnits(LoadScopeScheduling):
        """xdist's scheduling by scope, with shared_unit's scopes."""
        def _split_scope(self, nodeid):
            return shared_unit(nodeid) or nodeid
    return SharedUnits(config, log)
