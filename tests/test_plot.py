"""figures/plot.py (the paper's figures from the runs' logs), and the exact variance trajectory of
toy_exact.py."""
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import dpg_min as dm
import toy_exact

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def plot():
    """figures/plot.py as a module: its main(argv) draws, or raises SystemExit(2) on bad input."""
    spec = importlib.util.spec_from_file_location("figures_plot",
                                                  os.path.join(ROOT, "figures", "plot.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def two_runs(method_runs):
    """The session's GDC and GDC++ runs (conftest.METHOD_RUNS), logged at steps 0 and 10 of
    B = 64."""
    return [method_runs["gdc"]["out"], method_runs["gdcpp"]["out"]]


def table_of(out):
    """The Markdown rows of plot's stdout: a list of cells per row, header first."""
    return [[c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            for line in out.splitlines() if line.startswith("|")]


def fake_run(folder, rows, **flags):
    """A run folder with the given metrics rows, as plot reads it (config.json and
    metrics.jsonl)."""
    os.makedirs(folder)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"dpg_min": flags}, f)
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(folder)


def test_plot_writes_a_figure_and_a_markdown_table_of_the_runs(plot, two_runs, tmp_path, capsys,
                                                               read_metrics):
    out = tmp_path / "fig.png"
    plot.main([*two_runs, "--out", str(out),
               "--metrics", "E_pi_phi,var_A,mean_P_q,mean_Zpi_q,mean_A"])
    assert out.read_bytes()[:8] == PNG and out.stat().st_size > 10_000
    printed = capsys.readouterr().out
    rows = table_of(printed)
    assert rows[0][:3] == ["run", "samples", "E_π φ"] and rows[0][9] == "mean \\|A\\|"
    assert rows[1] == ["---"] * 12
    assert [r[:2] for r in rows[2:]] == [["GDC B=64", "640"], ["GDC++ B=64", "640"]]
    for row, run in zip(rows[2:], two_runs):
        last = read_metrics(run)[-1]
        assert row[2] == f"{last['E_pi_phi'][0]:.3g}" and row[3] == f"{last['kl_p_pi']:.3g}"
    assert printed.rstrip().endswith(f"wrote {out}")


@pytest.mark.parametrize("args, message", [
    (["/no/such/run", "--out", "FIG"], "'/no/such/run' holds no dpg_min run"),
    (["--out", "FIG"], "the following arguments are required: RUN_DIR"),
    (["RUN", "--out", "FIG", "--metrics", "nope"],
     "--metrics 'nope': none of these is logged by the runs"),
    (["RUN", "--out", "FIG", "--reach", "half"], "invalid float value"),
    (["RUN", "--out", "OLD"], "already exists; choose a new file, or add --overwrite"),
])
def test_plot_bad_input_is_one_line_exit_2_and_writes_nothing(plot, two_runs, tmp_path, capsys,
                                                              args, message):
    (tmp_path / "old.png").write_bytes(b"an earlier figure")
    stand_in = {"RUN": two_runs[0], "FIG": str(tmp_path / "f.png"),
                "OLD": str(tmp_path / "old.png")}
    with pytest.raises(SystemExit) as exit_info:
        plot.main([stand_in.get(a, a) for a in args])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and message in err and err.splitlines() == [err], err
    assert err.startswith("plot.py: error: ")
    assert sorted(os.listdir(tmp_path)) == ["old.png"]
    assert (tmp_path / "old.png").read_bytes() == b"an earlier figure"


def test_runs_with_different_seeds_are_labelled_by_seed(plot, two_runs, copy_run, tmp_path, capsys):
    """Fig. 5 plots several seeds of each method: the table names the seed (and only then)."""
    other = copy_run(two_runs[1], "seed13")
    config = json.loads((other / "config.json").read_text())
    config["dpg_min"]["seed"] = 13
    (other / "config.json").write_text(json.dumps(config))
    plot.main([*two_runs, str(other), "--out", str(tmp_path / "fig.png")])
    labels = [r[0] for r in table_of(capsys.readouterr().out)[2:]]
    assert labels == ["GDC B=64 seed 12", "GDC++ B=64 seed 12", "GDC++ B=64 seed 13"]


def test_a_closed_stdout_is_exit_0_without_a_traceback_and_the_figure_is_written(two_runs,
                                                                                 tmp_path):
    """`plot.py ... | head` may stop reading early: the figure is still written, and nothing is on
    stderr. A real pipe, block-buffered as in a user's shell (PYTHONUNBUFFERED unset)."""
    out = tmp_path / "fig.png"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    p = subprocess.Popen([sys.executable, os.path.join("figures", "plot.py"), *two_runs,
                          "--out", str(out)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    p.stdout.close()                                    # as `head` does once it has its lines
    err = p.stderr.read()
    assert (p.wait(), err) == (0, "") and out.read_bytes()[:8] == PNG


class ClosedPipe:
    """An unbuffered stdout (python -u, PYTHONUNBUFFERED=1) whose reader is gone: every write
    raises."""
    def __init__(self, fd):
        self.fd = fd

    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        pass

    def fileno(self):
        return self.fd


def test_an_unbuffered_closed_stdout_still_gets_the_figure_written(plot, two_runs, tmp_path,
                                                                   monkeypatch):
    out = tmp_path / "fig.png"
    sink = os.open(tmp_path / "stdout", os.O_WRONLY | os.O_CREAT)
    # main points the fd at /dev/null: ours, not 1
    monkeypatch.setattr(sys, "stdout", ClosedPipe(sink))
    try:
        plot.main([*two_runs, "--out", str(out)])
    finally:
        os.close(sink)
    assert out.read_bytes()[:8] == PNG


def test_without_matplotlib_plot_says_how_to_install_it(plot, two_runs, tmp_path, monkeypatch,
                                                        capsys):
    # `import matplotlib` now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit) as exit_info:
        plot.main([two_runs[0], "--out", str(tmp_path / "f.png")])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.endswith("pip install matplotlib")
    assert err.splitlines() == [err]
    assert not (tmp_path / "f.png").exists()
    with pytest.raises(ImportError):
        toy_exact.plot_trajectory([], str(tmp_path / "t.png"))


def test_the_fig_2_quantities_make_up_the_advantage(two_runs, read_metrics):
    """mean A = mean P/q − mean Ẑ·π/q for GDC++ (Fig. 2); for GDC, A = P/q."""
    for out, baseline in zip(two_runs, (False, True)):
        trained = [r for r in read_metrics(out) if r["step"] > 0]
        assert trained
        for row in trained:
            assert row["mean_P_q"] > 0 and row["mean_Zpi_q"] > 0
            expected = row["mean_P_q"] - (row["mean_Zpi_q"] if baseline else 0)
            assert row["mean_A"] == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_samples_to_reach_a_target_and_the_mean_variances_are_read_from_the_log(plot, tmp_path,
                                                                                 capsys):
    rows = [dict(step=s, samples=100 * s, E_pi_phi=[v, 0.9], kl_p_pi=None if s == 3 else 1.0,
                 kl_pi_a=0.5, tvd_p_pi=0.25, self_bleu_5=0.125, distinct_1=0.75,
                 mean_abs_A=None if s == 0 else float(s), var_A=None if s == 0 else 2.0 * s,
                 var_G=None)
            for s, v in enumerate([0.1, 0.4, 0.55, 0.3])]
    run = fake_run(tmp_path / "run", rows, method="reinforce", baseline=True, batch_size=100,
                   seed=3)
    table = {}
    for reach in ("0.5", "0.6"):
        plot.main([run, "--out", str(tmp_path / f"{reach}.png"), "--reach", reach])
        table[reach] = table_of(capsys.readouterr().out)
    assert table["0.5"][0][8] == "samples to E_π φ ≥ 0.5"
    assert table["0.6"][0][8] == "samples to E_π φ ≥ 0.6"
    assert table["0.5"][2] == ["Reinforce-baseline B=100", "300", "0.3/0.9", "inf", "0.5", "0.25",
                               "0.125", "0.75", "200", "2", "4", "-"]
    assert table["0.6"][2][8] == "never"


def test_the_exact_trajectory_keeps_the_paper_identities_at_every_step(tmp_path):
    """Along exact-gradient DPG (toy_exact.trajectory): E_q|A| = 2·Z·TVD (eq. 21), b* beats both
    baselines, GDC's E|A| is Z, KL(p‖π) falls, q is replaced by π now and then (Algorithm 1); and it
    is drawn."""
    rows = toy_exact.trajectory(steps=30)
    for r in rows:
        assert r["E_abs_A"] == pytest.approx(2 * r["Z"] * r["tvd_p_pi"], rel=1e-10)
        assert r["E_abs_A_gdc"] == pytest.approx(r["Z"], rel=1e-10)
        assert r["var_G_best"] <= min(r["var_G_gdc"], r["var_G_gdcpp"]) * (1 + 1e-12)
        if r["q_is_pi"]:                                       # the baseline is then the constant Z
            assert r["var_A_gdcpp"] == pytest.approx(r["var_A_gdc"], rel=1e-9)
    assert rows[-1]["kl_p_pi"] < rows[0]["kl_p_pi"] / 2
    assert 0 < sum(not r["q_is_pi"] for r in rows) < len(rows)
    assert "Var(G) is lower with the baseline" in toy_exact.summarise(rows)
    toy_exact.plot_trajectory(rows, str(tmp_path / "t.png"))
    assert (tmp_path / "t.png").read_bytes()[:8] == PNG
    assert (tmp_path / "t.png").stat().st_size > 10_000


def test_toy_exact_trajectory_command_prints_the_summary_and_draws_it(tmp_path, capsys):
    """`python toy_exact.py --plot F` (which implies --trajectory), its main in-process: the
    summary, the figure, the KL and TVD forms' table (~9 s: 300 exact steps, 2×2×200 Monte-Carlo
    q-checks)."""
    assert toy_exact.main(["--plot", str(tmp_path / "t.png")]) == 0
    stdout = capsys.readouterr().out
    assert "Var(G) is lower with the baseline Z·π/q than without at" in stdout
    assert f"wrote {tmp_path / 't.png'}" in stdout
    assert "D_KL, over the 16 settings (gdc's / p-inside / q_check): RMS" in stdout
    assert "TVD, over the 16 settings (Ẑ / q_check): RMS" in stdout
    assert (tmp_path / "t.png").read_bytes()[:8] == PNG
    assert (tmp_path / "t.png").stat().st_size > 10_000


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"figures_{name}",
                                                  os.path.join(ROOT, "figures", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_bench_times_a_slice_of_train_on_cpu_at_small_sizes(capsys):
    """figures/gpu_bench.py (issue 29's benchmark) on the tiny model, so that it cannot rot: the
    matmul rate, samples/s, ms per token against its bound, peak memory, the paper's run
    extrapolated by cost.py, and the slice's last row of metrics."""
    last = load_script("gpu_bench").bench([
        "--model", "tiny", "--device", "cpu", "--batch-size", "8", "--seq-len", "4", "--steps", "2",
        "--q-update-interval", "1", "--eval-interval", "1", "--eval-samples", "8",
        "--diversity-samples", "8", "--forward-batch-size", "4"])
    printed = capsys.readouterr().out
    assert re.search(r"tiny: N = 0\.\dM parameters on cpu, R = [\d.e+-]+ TFLOP/s", printed)
    assert re.search(r"2 steps in [\d.]+ s, [\d.e+]+ training samples/s; peak memory", printed)
    assert re.search(r"ms per token step of f = 4 rows, [\d.e+]+× its bound 2·N·f/R", printed)
    assert "the paper's budget at these costs" in printed
    assert last["step"] == 2


def test_base_rates_prints_every_feature_and_a_sample_that_meets_it(capsys):
    load_script("base_rates").main(["--model", "tiny", "--seq-len", "10", "--samples", "64",
                                    "--seed", "1"])
    printed = capsys.readouterr().out
    rows = {r[0]: r for r in table_of(printed)[2:]}
    # sentiment: no classifier given
    assert set(rows) == {"`word:amazing`", "`word:WikiLeaks`", "`list:politics`", "`list:science`",
                         "`female`", "`list:art`", "`list:sports`", "`list:business`"}
    for row in rows.values():
        assert float(row[1].rstrip("%")) == pytest.approx(100 * int(row[2]) / 64, abs=0.01)
    assert "list:politics: '" in printed and int(rows["`list:politics`"][2]) > 0


def test_compare_reloads_each_pi_and_prints_it_beside_a(two_runs, capsys, read_metrics):
    load_script("compare").main([*two_runs, "--samples", "32", "--show", "2"])
    printed = capsys.readouterr().out
    rows = table_of(printed)
    assert rows[0][:4] == ["model", "from", "E_pi_phi", "kl_pi_a"]
    assert [r[0] for r in rows[2:]] == ["a", "GDC", "GDC++"]
    # KL(a‖a) = 0; π moved away from a
    assert abs(float(rows[2][3])) < 1e-3 and float(rows[4][3]) > 0.01
    # two samples of each of the 3 models
    assert rows[3][1] == two_runs[0] and printed.count("\n    '") == 6


@pytest.mark.parametrize("script, args, message", [
    ("compare", ["/no/such/run"], "'/no/such/run' holds no dpg_min run"),
    ("compare", ["RUN", "--samples", "0"], "--samples must be a positive integer"),
    ("base_rates", ["--samples", "-1"], "must be positive integers"),
    ("base_rates", ["--model", "/no/such/model"], "cannot load --model '/no/such/model'"),
    ("cost", ["/no/such/run"], "'/no/such/run' holds no dpg_min run"),
    ("fig4_exact", ["--batch-sizes", "2,0"], "must be positive integers, e.g. 2,8,32, got '2,0'"),
    ("fig4_exact", ["--samples", "4", "--batch-sizes", "8"], "less than one batch of 8"),
    ("fig4_exact", ["--out", "RUN"], "already exists; choose a new file, or add --overwrite"),
])
def test_the_figure_scripts_bad_input_is_one_line_exit_2(two_runs, capsys, script, args, message):
    with pytest.raises(SystemExit) as exit_info:
        load_script(script).main([two_runs[0] if a == "RUN" else a for a in args])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and message in err and err.splitlines() == [err], err


def test_cost_reads_the_runs_own_phase_seconds(two_runs, capsys):
    """cost.py's totals are the sums of the run's seconds_* keys; its sample counts, train()'s."""
    load_script("cost").main([two_runs[0]])
    printed = capsys.readouterr().out
    rows = [json.loads(line) for line in open(os.path.join(two_runs[0], "metrics.jsonl"))]
    flags = json.load(open(os.path.join(two_runs[0], "config.json")))["dpg_min"]
    for phase in dm.PHASES:
        assert f"{phase} {sum(r['seconds_' + phase] for r in rows):.1f} s" in printed
    K = flags["q_update_interval"]
    steps = rows[-1]["step"]
    q_seconds = sum(r["seconds_q_check"] for r in rows)
    checks = len([s for s in range(steps + 1) if s % K == 0 or s == steps])
    q_samples = K * flags["batch_size"] * checks
    assert f"per q-check sample {q_seconds / q_samples:.3g} s" in printed
    assert "the paper's budget at these costs" in printed


def test_self_bleu_bench_times_both_ways_and_finds_them_equal(capsys):
    load_script("self_bleu_bench").main(["--texts", "20", "40", "--old-up-to", "20",
                                         "--seq-len", "10"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[0] == "20" and lines[1].endswith("0.0e+00")     # nltk's floats exactly
    assert lines[2].split()[:2] == ["40", "-"]                               # nltk's way skipped


def test_gpu_check_is_bash_whose_runs_are_dpg_min_flags():
    """No GPU here: the script's syntax, and each run's flags as dpg_min.py parses them."""
    path = os.path.join(ROOT, "figures", "gpu_check.sh")
    assert subprocess.run(["bash", "-n", path]).returncode == 0
    text = open(path).read().replace("\\\n", " ")
    runs = [line.split()[2:] for line in text.splitlines() if line.startswith("run ")]
    assert [flags[1] for flags in runs] == ["tiny", "smollm2"]
    for flags in runs:
        cfg = dm.parse_config(flags + ["--device", "cuda", "--out", "unused"])
        assert cfg.device == "cuda" and cfg.baseline


def test_fig4_exact_metrics_are_toy_exacts_and_each_seed_trains_alone(tmp_path, capsys):
    """figures/fig4_exact.py: its E_π φ, D_KL(p‖π), TVD(p, π) and Var(G) are toy_exact.py's sums at
    the same π and q, on both targets; a seed's run is the same alone or beside others (SGD on one
    target, Adam on the other: both are elementwise); the command prints its tables and draws the
    figure."""
    fig4 = load_script("fig4_exact")
    for mu in (None, 0.5):
        X, logp, theta_a, logp_a, phi, log_P = toy_exact.toy_target(mu=mu)
        Z = torch.logsumexp(log_P, 0).exp()
        log_p = log_P - Z.log()
        run = fig4.train_seeds(True, 4, 3, 40, 0.05, K=2, mu=mu)
        assert run["E"].shape == (11, 3) and run["A_mean"].shape == (10, 3)
        for s in range(3):
            log_pi = run["log_pi"][s]
            exact = (log_pi.exp() @ phi[:, 0], toy_exact.kl(log_p, log_pi),
                     toy_exact.tvd(log_p, log_pi))
            for key, value in zip(("E", "kl", "tvd"), exact):
                assert run[key][-1, s] == pytest.approx(float(value), abs=1e-12)
        sgd = mu is None
        both = fig4.train_seeds(True, 4, 3, 40, 0.05, K=2, mu=mu, sgd=sgd)["kl"]
        alone = fig4.train_seeds(True, 4, 1, 40, 0.05, K=2, mu=mu, sgd=sgd)["kl"]
        assert torch.allclose(alone[:, 0], both[:, 0], rtol=0, atol=1e-12)
        # q stays a (K beyond the run): Var(G) off-policy at the last π, and on-policy at the start
        run = fig4.train_seeds(False, 4, 2, 40, 0.1, K=100, mu=mu, probe=(0, 10))
        inst = SimpleNamespace(X=X, logp=logp, log_P=log_P, Z=Z)
        for i, theta in enumerate((theta_a.flatten(), run["theta"][1])):
            var = toy_exact.variance_terms(inst, theta, logp_a)[0]
            assert run["var_gdc"][i, 1] == pytest.approx(float(var(Z * 0)), rel=1e-10)
            assert run["var_gdcpp"][i, 1] == pytest.approx(float(var(Z)), rel=1e-10)
            mean = logp_a.exp() @ toy_exact.dpg_grads(inst, theta, logp_a, Z, baseline=False)
            assert run["mean2"][i, 1] == pytest.approx(float(mean @ mean), rel=1e-10)
    assert fig4.reached(torch.tensor([[0.1, 0.2], [0.6, 0.3]]), 4).tolist() == [4.0, math.inf]
    out = tmp_path / "fig4.png"
    fig4.table(["--seeds", "2", "--samples", "16", "--batch-sizes", "2,4", "--lr", "0.1",
                "--out", str(out)])
    printed = capsys.readouterr().out
    assert printed.count("B =    2  GDC++") == 6 and "all 0:" in printed and out.stat().st_size
