"""benchmarks/plot_sample_quality.py draws issue 26's figure from pyrovae
evaluate's own JSON lines: it reads the last JSON line of each file, and a file
without the sample scores is refused with its name."""

import json
import runpy
import sys

import pytest

SCRIPT = "benchmarks/plot_sample_quality.py"


def result(tmp_path, name, **row):
    path = tmp_path / name
    path.write_text("progress line\n" + json.dumps(row) + "\n")
    return str(path)


def run(argv, monkeypatch):
    monkeypatch.setattr(sys, "argv", [SCRIPT, *argv])
    runpy.run_path(SCRIPT, run_name="__main__")


def test_plots_a_line_per_run_and_sampler_and_prints_the_table(tmp_path, monkeypatch, capsys):
    files = [
        result(tmp_path, f"{run}-{s}-{k}.json", run=run, sampler=s, sample_steps=k, fd_judge=fd,
               kid_judge=1.0, seconds_per_1000_samples=k * 9.0, scored_samples=500)
        for run, s, k, fd in [("chain", "ddim", 10, 30.0), ("chain", "ddim", 50, 20.0), ("vdm", "ancestral", 100, 90.0)]
    ]  # fmt: skip
    files.append(result(tmp_path, "eta1.json", run="chain", sampler="ddim", eta=1.0, sample_steps=50, fd_judge=10.0,
                        kid_judge=1.0, seconds_per_1000_samples=450.0))  # fmt: skip
    out = tmp_path / "figure.png"
    run([str(out), *files], monkeypatch)
    assert out.read_bytes()[:4] == b"\x89PNG"
    table = capsys.readouterr().out.splitlines()
    assert table[2:] == [
        "| chain | ddim | 10 | 30.0 | 1.0 | 90 |",
        "| chain | ddim | 50 | 20.0 | 1.0 | 450 |",
        "| chain | ddim, eta 1 | 50 | 10.0 | 1.0 | 450 |",
        "| vdm | ancestral | 100 | 90.0 | 1.0 | 900 |",
    ]


def test_a_file_without_sample_scores_is_refused_by_name(tmp_path, monkeypatch):
    bad = result(tmp_path, "bound-only.json", run="chain", test_bpd=2.1)
    with pytest.raises(SystemExit, match="bound-only.json: no 'sampler': run pyrovae evaluate with --samples N"):
        run([str(tmp_path / "f.png"), bad], monkeypatch)
