"""The Python blocks of README.md and docs/*.md run as written.

Every fenced ``python`` block is executed on the CPU in a fresh namespace,
with a temporary folder as the working directory and Pyro's validation on, as
a user would paste it. The line right before a block's opening fence may hold
a marker:

- ``<!-- snippet: not run (why) -->``: a fragment that uses something from
  elsewhere (a trained ``vae``, a run folder, a GPU); the reason is required;
- ``<!-- snippet: slow -->``: runnable, but it trains for a while, so it runs
  under the ``slow`` marker.
"""

from __future__ import annotations

import pathlib
import re

import pyro
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
MARKER = re.compile(r"<!--\s*snippet:\s*(not run|slow)\b\s*(.*?)\s*-->")


def python_blocks(path: pathlib.Path):
    """``(line, code, marker, reason)`` for each fenced python block of ``path``."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i + 1
            end = next(j for j in range(start, len(lines)) if lines[j].strip() == "```")
            found = MARKER.search(lines[i - 1]) if i > 0 else None
            blocks.append((start, "\n".join(lines[start:end]), found and found.group(1), found and found.group(2)))
            i = end
        i += 1
    return blocks


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [(path, *block) for path in DOCS for block in python_blocks(path)]


def _param(path, line, code, marker, reason):
    marks = [pytest.mark.slow] if marker == "slow" else []
    if marker == "not run":
        marks.append(pytest.mark.skip(reason=f"marked not run: {reason}"))
    return pytest.param(path, code, marks=marks, id=f"{path.relative_to(ROOT)}:{line}")


@pytest.mark.parametrize("path, code", [_param(*b) for b in BLOCKS])
def test_snippet_runs_as_written(path, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pyro.clear_param_store()
    exec(compile(code, str(path), "exec"), {"__name__": "__snippet__"})


def test_fragments_say_why_and_most_snippets_run():
    fragments = [
        (p.name, line) for p, line, _, marker, reason in BLOCKS if marker == "not run" and not reason.strip("() ")
    ]
    assert not fragments, f"blocks marked 'not run' without a reason: {fragments}"
    runnable = [b for b in BLOCKS if b[3] != "not run"]
    assert len(runnable) >= 4 and BLOCKS[0][0].name == "README.md" and BLOCKS[0][3] != "not run"


NOTEBOOKS = sorted((ROOT / "tutorials").glob("*.ipynb"))
LOCAL_PATH = re.compile(r"(/root/|/home/|/work/|/Users/|site-packages|[A-Z]:\\\\)")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_committed_tutorial_outputs_hold_no_warnings_or_local_paths(path):
    import nbformat

    nb = nbformat.read(path, as_version=4)
    for i, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            text = output.get("text", "") + str(output.get("data", {}).get("text/plain", ""))
            assert "Warning" not in text and not LOCAL_PATH.search(text), f"{path.name} cell {i}: {text[:200]!r}"


def test_diffusion_tutorial_introduction_lists_its_sections():
    import nbformat

    nb = nbformat.read(ROOT / "tutorials" / "diffusion_as_hierarchical_vae.ipynb", as_version=4)
    markdown = [c.source for c in nb.cells if c.cell_type == "markdown"]
    listed = [int(n) for n in re.findall(r"^(\d+)\. ", markdown[0], re.M)]
    headings = [int(n) for text in markdown[1:] for n in re.findall(r"^## (\d+)\. ", text, re.M)]
    assert listed == headings == list(range(1, len(headings) + 1))
