"""The README and docs/ name only things that exist: links, config choices, commands and files.

Cheap (text only): a renamed preset, a moved heading or a deleted file breaks a test here instead
of a user's command.
"""

from __future__ import annotations

import importlib.util
import re
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
# group=choice as users type it; the look-behind skips dotted keys such as trainer.strategy=ddp
GROUPS = {
    "experiment": CONF / "experiment",
    "trainer": CONF / "trainer",
    "dataset": CONF / "dataset",
    "backbone": CONF / "backbone",
    "logger": CONF / "logger",
    "callbacks": CONF / "callbacks",
    "debug": CONF / "debug",
    "mining.positive": CONF / "mining.positive",
    "mining.negative": CONF / "mining.negative",
    "+sweep": CONF / "sweep",
    "protocol": CONF / "eval" / "protocol",
}
CHOICE = re.compile(r"(?<![\w.+])(" + "|".join(re.escape(g) for g in GROUPS) + r")=(\[[\w,]+\]|\w[\w,]*)")
REPO_PATH = re.compile(r"`((?:mcl|tests|benchmarks|conf|notebooks|docs)/[^`\s]*)`")


def text(page: Path) -> str:
    return page.read_text(encoding="utf-8")


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes, -1 for repeats."""
    seen: Counter[str] = Counter()
    out = set()
    for line in FENCE.sub("", text(page)).splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        out.add(slug if not seen[slug] else f"{slug}-{seen[slug]}")
        seen[slug] += 1
    return out


def links() -> list[tuple[Path, str]]:
    return [(page, target) for page in PAGES for target in LINK.findall(FENCE.sub("", text(page)))]


def test_the_pages_exist_and_the_readme_links_each_docs_page():
    assert len(PAGES) > 1
    linked = {(ROOT / t.split("#")[0]).resolve() for p, t in links() if p.name == "README.md" and not t.startswith("http")}
    unlinked = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert not unlinked, f"docs pages the README does not link: {unlinked}"


@pytest.mark.parametrize("page,target", links(), ids=lambda x: x.name if isinstance(x, Path) else x)
def test_every_link_points_to_an_existing_file_and_heading(page, target):
    if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked offline
        return
    path, _, anchor = target.partition("#")
    file = (page.parent / path).resolve() if path else page
    assert file.exists(), f"{page.name}: link to a missing file {target}"
    assert ROOT in file.parents or file == ROOT, f"{page.name}: link leaves the repository: {target}"
    if anchor:
        assert anchor in anchors(file), f"{page.name}: no heading #{anchor} in {file.name}; it has {sorted(anchors(file))}"


def named_choices(unknown: bool = False) -> list[tuple[str, str, str]]:
    """(page, group, choice) named on the pages; `unknown`: those on lines showing Hydra's error for a missing choice."""
    found = set()
    for page in PAGES:
        for line in text(page).splitlines():
            if ("MissingConfigException" in line) == unknown:
                for group, values in CHOICE.findall(line):
                    found |= {(page.name, group, v) for v in values.strip("[]").split(",") if v}
    return sorted(found)


def test_the_pages_name_config_choices():
    groups = {group for _, group, _ in named_choices()}
    assert {"experiment", "mining.positive", "mining.negative", "+sweep", "trainer"} <= groups


@pytest.mark.parametrize("page,group,choice", named_choices())
def test_every_named_config_choice_exists(page, group, choice):
    assert (GROUPS[group] / f"{choice}.yaml").is_file(), f"{page} names {group}={choice}, but {GROUPS[group]} has no {choice}.yaml"


def test_the_choices_shown_as_bad_input_do_not_exist():
    shown = named_choices(unknown=True)
    assert shown
    for page, group, choice in shown:
        assert not (GROUPS[group] / f"{choice}.yaml").exists(), f"{page} shows {group}={choice} as an unknown choice, but it exists"


def test_every_python_module_and_make_target_shown_exists():
    pages = "\n".join(text(p) for p in PAGES)
    modules = set(re.findall(r"python -m (mcl[\w.]*)", pages))
    assert "mcl.train" in modules
    missing = [m for m in sorted(modules) if importlib.util.find_spec(m) is None]
    assert not missing, f"modules shown but not in the package: {missing}"
    targets = set(re.findall(r"(?:^|`)make ([a-z][\w-]*)", pages, re.M))
    makefile = set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))
    assert {"install", "test", "demo"} <= targets
    assert targets <= makefile, f"make targets shown but not in the Makefile: {sorted(targets - makefile)}"


def test_every_repository_file_named_exists():
    named = {m for page in PAGES for m in REPO_PATH.findall(text(page)) if not re.search(r"[*<]", m)}
    assert named
    for item in sorted(named):
        path, _, test = item.partition("::")
        assert (ROOT / path).exists(), f"the docs name {path}, which does not exist"
        if test:
            assert re.search(rf"^def {re.escape(test)}\b", (ROOT / path).read_text(), re.M), f"no test {test} in {path}"


def test_no_page_relies_on_files_outside_the_repository():
    # a fresh clone has no sibling folders and none of the lab's working notes
    note = "METHOD" + ".md"
    for page in PAGES:
        assert "../shared" not in text(page), page.name
    sources = [p for d in ("mcl", "conf", "tests", "benchmarks", "notebooks", "docs") for p in (ROOT / d).rglob("*") if p.is_file()]
    sources += [ROOT / "README.md", ROOT / "Makefile", ROOT / "pyproject.toml"]
    for path in sources:
        if path.suffix in {".py", ".yaml", ".md", ".ipynb", ".toml", ""} and "__pycache__" not in path.parts:
            assert note not in path.read_text(encoding="utf-8", errors="ignore"), f"{path.relative_to(ROOT)} refers to {note}"


def test_the_license_is_mit_and_named_in_pyproject():
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert re.search(r'^license = "MIT"$', (ROOT / "pyproject.toml").read_text(), re.M)
