"""Issue 6: the plot command and the exact variance trajectory of toy_exact.py."""
import json
import os
import shutil
import subprocess
import sys

import pytest

import dpg_min as dm
import toy_exact
from test_train import run, small_config


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """A GDC and a GDC++ run on the tiny model, 3 steps each, logged at every step."""
    tmp = tmp_path_factory.mktemp("runs")
    outs = []
    for baseline in (False, True):
        cfg = small_config(tmp, baseline=baseline, steps=3, eval_interval=1, out=str(tmp / f"b{int(baseline)}"))
        run(cfg)
        outs.append(cfg.out)
    return outs


def test_plot_writes_a_figure_and_a_table_of_the_runs(two_runs, tmp_path, capsys):
    out = tmp_path / "fig.png"
    dm.main(["plot", *two_runs, "--out", str(out), "--metrics", "E_pi_phi,var_A,mean_P_q,mean_Zpi_q,mean_A"])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    table = capsys.readouterr().out.splitlines()
    assert table[2].startswith("| GDC B=64 | 192 |") and table[3].startswith("| GDC++ B=64 | 192 |")
    with pytest.raises(SystemExit) as exit_info:                # never overwritten by accident
        dm.main(["plot", *two_runs, "--out", str(out)])
    assert exit_info.value.code == 2 and "add --overwrite" in capsys.readouterr().err


def test_seeds_are_told_apart_and_a_closed_pipe_is_no_error(two_runs, tmp_path, capsys):
    """Fig. 5 plots several seeds of each method: the table names the seed. `plot ... | head` may stop
    reading early: the figure is still written, and nothing is printed on stderr."""
    other = tmp_path / "seed13"                                 # the GDC++ run, relabelled as seed 13
    shutil.copytree(two_runs[1], other)
    config = json.loads((other / "config.json").read_text())
    config["dpg_min"]["seed"] = 13
    (other / "config.json").write_text(json.dumps(config))
    out = tmp_path / "fig.png"
    p = subprocess.Popen([sys.executable, "dpg_min.py", "plot", *two_runs, str(other), "--out", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.stdout.close()                                            # as `head` does once it has its lines
    err = p.stderr.read()
    assert p.wait() == 0 and err == "" and out.stat().st_size > 10_000
    dm.main(["plot", *two_runs, str(other), "--out", str(out), "--overwrite"])
    table = capsys.readouterr().out.splitlines()
    assert [row.split(" | ")[0] for row in table[2:5]] == ["| GDC B=64 seed 12", "| GDC++ B=64 seed 12",
                                                           "| GDC++ B=64 seed 13"]


def test_the_fig_2_quantities_make_up_the_advantage(two_runs):
    """mean A = mean P/q − mean Ẑ·π/q for GDC++; for GDC, A = P/q."""
    for out, baseline in zip(two_runs, (False, True)):
        for row in [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))][1:]:
            expected = row["mean_P_q"] - (row["mean_Zpi_q"] if baseline else 0)
            assert row["mean_A"] == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_samples_to_reach_a_target_are_read_from_the_log():
    rows = [dict(step=s, samples=100 * s, E_pi_phi=[v], kl_p_pi=1.0, kl_pi_a=1.0, tvd_p_pi=0.5, self_bleu_5=0.1,
                 distinct_1=0.5, mean_abs_A=None, var_A=None) for s, v in enumerate([0.1, 0.4, 0.55, 0.3])]
    assert "| 200 |" in dm.summary("r", rows, 0.5) and "| never |" in dm.summary("r", rows, 0.6)


@pytest.mark.parametrize("args, message", [
    (["plot", "/no/such/run", "--out", "f.png"], "holds no dpg_min run"),
    (["plot", "--out", "f.png"], "the following arguments are required: RUN_DIR"),
    (["plot", "RUN", "--out", "f.png", "--metrics", "nope"], "none of these is logged"),
])
def test_plot_bad_input_is_one_line(two_runs, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        dm.main([{"RUN": two_runs[0], "f.png": str(tmp_path / "f.png")}.get(a, a) for a in args])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "f.png").exists()


def test_without_matplotlib_plot_says_how_to_install_it(two_runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)       # `import matplotlib` now raises ImportError
    with pytest.raises(SystemExit) as exit_info:
        dm.main(["plot", two_runs[0], "--out", str(tmp_path / "f.png")])
    assert exit_info.value.code == 2 and "pip install matplotlib" in capsys.readouterr().err
    with pytest.raises(ImportError):
        toy_exact.plot_trajectory([], str(tmp_path / "t.png"))


def test_the_exact_trajectory_keeps_the_paper_identities_at_every_step():
    """Along exact-gradient DPG: E_q|A| = 2·Z·TVD (eq. 21), b* beats both baselines, GDC's E|A| is Z,
    KL(p‖π) falls, and q is replaced by π now and then (Algorithm 1)."""
    rows = toy_exact.trajectory(steps=30)
    for r in rows:
        assert r["E_abs_A"] == pytest.approx(2 * r["Z"] * r["tvd_p_pi"], rel=1e-10)
        assert r["E_abs_A_gdc"] == pytest.approx(r["Z"], rel=1e-10)
        assert r["var_G_best"] <= min(r["var_G_gdc"], r["var_G_gdcpp"]) * (1 + 1e-12)
        if r["q_is_pi"]:                                       # the baseline is then the constant Z
            assert r["var_A_gdcpp"] == pytest.approx(r["var_A_gdc"], rel=1e-9)
    assert rows[-1]["kl_p_pi"] < rows[0]["kl_p_pi"] / 2
    assert 0 < sum(not r["q_is_pi"] for r in rows) < len(rows)
    assert "steps" in toy_exact.summarise(rows)


def test_toy_exact_trajectory_prints_a_summary_and_draws_it(tmp_path):
    result = subprocess.run([sys.executable, "toy_exact.py", "--trajectory", "--plot", str(tmp_path / "t.png")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "Var(G) is lower with the baseline" in result.stdout and (tmp_path / "t.png").stat().st_size > 10_000


def test_a_closed_pipe_during_training_is_exit_1_without_a_traceback(monkeypatch, capfd):
    """Unlike plot's, a run cut off by its reader has not finished: it must not look like a success."""
    def reader_gone(*args, **kwargs):
        raise BrokenPipeError
    monkeypatch.setattr(dm, "train", reader_gone)
    saved = os.dup(1)                                           # main points fd 1 at /dev/null: undo that
    try:
        with pytest.raises(SystemExit) as exit_info:
            dm.main(["--model", "tiny", "--task", "amazing", "--out", "unused"])
    finally:
        os.dup2(saved, 1)
        os.close(saved)
    assert exit_info.value.code == 1 and capfd.readouterr().err == ""
