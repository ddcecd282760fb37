"""Every ``>>>`` example in docs/ runs and prints what the page says; generated pages match their generator.

The examples sit in fenced ``python`` blocks, so that GitHub renders them as code; the blocks
are extracted (tests/markdown_blocks.py) and run by doctest, one namespace per page.
"""

from __future__ import annotations

import doctest
from pathlib import Path

import pytest

from markdown_blocks import doctest_text, prompts_outside_blocks

DOCS = Path(__file__).resolve().parent.parent / "docs"
PAGES = sorted(DOCS.glob("*.md"))
README = DOCS.parent / "README.md"


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_examples_run(page):
    import numpy as np
    saved = np.get_printoptions()
    test = doctest.DocTestParser().get_doctest(doctest_text(page), {}, page.name, str(page), 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    try:
        runner.run(test)
    finally:
        np.set_printoptions(**saved)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{page}: {result.failed} of {result.attempted} examples failed (doctest output above)"


@pytest.mark.parametrize("page", [*PAGES, README], ids=[page.name for page in [*PAGES, README]])
def test_examples_are_fenced_python_blocks(page):
    """A ``>>>`` line outside a fence renders on GitHub as nested block quotes, prompts stripped."""
    assert prompts_outside_blocks(page) == [], f"{page.name}: >>> outside a ```python block at lines {prompts_outside_blocks(page)}"


def test_conventions_page_is_generated_from_the_spec():
    import runpy
    render = runpy.run_path(str(DOCS / "make_conventions.py"))["render"]
    assert (DOCS / "conventions.md").read_text(encoding="utf-8") == render(), "docs/conventions.md is stale: run python docs/make_conventions.py"


def test_every_figure_a_page_shows_exists_and_has_a_maker():
    import re
    source = (DOCS / "figures" / "make_figures.py").read_text(encoding="utf-8")
    for page in PAGES:
        for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", page.read_text(encoding="utf-8")):
            assert (DOCS / image).is_file(), f"{page.name}: figure {image} is missing"
            assert Path(image).name in source, f"{page.name}: no script makes {image}"


@pytest.mark.slow
def test_figure_script_runs(tmp_path):
    """Slow step only: it needs matplotlib (the bench extra), which .ci/run installs there."""
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install matplotlib; CI's slow step has it)")
    import runpy
    namespace = runpy.run_path(str(DOCS / "figures" / "make_figures.py"))
    namespace["main"](tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(namespace["FIGURES"])
