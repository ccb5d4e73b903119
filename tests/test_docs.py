"""The README is for users and short; measurements live in docs/ with their commands; links and targets do not rot."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
MAX_README_LINES = 300


def make_targets() -> set[str]:
    """Every documented target of the Makefile (`name: ... ## what it does`)."""
    text = (REPO / "Makefile").read_text()
    return set(re.findall(r"^([a-z][a-z-]*):.*## ", text, flags=re.M))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but hyphens dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(m) for m in re.findall(r"^#+ (.+)$", path.read_text(), flags=re.M)}


def test_readme_is_short_and_starts_with_the_two_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= MAX_README_LINES
    quick = text.split("## Quick start", 1)[1].split("```")[1]
    commands = [line.split("#")[0].strip() for line in quick.strip().splitlines()]
    assert commands == ["make demo", "make test"]


def test_results_live_in_docs_with_their_commands():
    results = (REPO / "docs" / "results.md").read_text()
    assert "| held-out 278 images | micro-F1 | macro-F1 | wall s |" in results  # the compare table
    for section in re.split(r"^## ", results, flags=re.M)[1:]:  # every table names its command and commit
        assert "`make " in section or "`seedlings " in section, section[:80]
        assert re.search(r"\b[0-9a-f]{7}\b", section), section[:80]
        assert re.search(r"Intel Xeon|AMD EPYC|H100|H200", section), section[:80]  # its machine, by CPU or GPU model


def test_no_words_that_go_stale():
    """Figures name their machine, never when they were measured; no issue numbers in what ships."""
    shipped = [README, *DOCS, *(REPO / "src").rglob("*.py"), *(REPO / "tests").glob("*.py"), REPO / "Makefile"]
    for path in shipped:
        text = path.read_text()
        assert not re.search(r"\bissue #?[0-9]+", text, flags=re.I), path
        assert not re.search(r"(this|earlier|last) sess[i]on", text, flags=re.I), path


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.name)
def test_relative_links_resolve(path):
    for target in re.findall(r"\]\(([^)#\s]*)(#[^)\s]*)?\)", path.read_text()):
        file, anchor = target
        if file.startswith(("http://", "https://")):
            continue
        linked = (path.parent / file).resolve() if file else path
        assert linked.exists(), f"{path.name}: {file} not found"
        if anchor and linked.suffix == ".md":
            assert anchor[1:] in anchors(linked), f"{path.name}: {file}{anchor} names no heading"


def test_readme_lists_every_make_target_and_no_other():
    table = README.read_text().split("## Make targets", 1)[1].split("\n## ", 1)[0]
    listed = {t for row in re.findall(r"^\| (.+?) \|", table, flags=re.M) for t in re.findall(r"`([a-z-]+)`", row)}
    assert listed == make_targets()


def test_the_readmes_code_table_names_every_module():
    table = README.read_text().split("## Where the code is", 1)[1].split("\n## ", 1)[0]
    for path in sorted((REPO / "src" / "seedlings").rglob("*.py")):
        if path.name != "__init__.py":
            assert re.search(rf"`({path.stem}|{path.name})[` ]", table), path
