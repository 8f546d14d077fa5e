"""The front page and the manual: every relative link and anchor resolves, every page is reachable, code is real API.

Checked for ``README.md`` and every ``docs/*.md``:

* every relative link (markdown links and images, and HTML ``href``/``src``) points to an existing file or folder;
* every ``#anchor`` (in the same file or in another markdown file) matches a heading, slugged by GitHub's rules
  (lowercase, punctuation dropped except ``-`` and ``_``, spaces to ``-``, ``-1``, ``-2`` … for repeats);
* every docs page is linked from ``README.md`` or ``docs/README.md``;
* fenced ``python`` blocks parse, and every ``tn.NAME`` they use is in ``dir(tellnorm)``.

Links, headings and ``tn.`` names inside code (fenced blocks, inline code spans) are code, not links, and are skipped
by the link checker. ``test_checker_*`` run the checker on made-up documents, so a checker that passes everything
fails here.
"""

from __future__ import annotations

import ast
import re
import unicodedata
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
INDEXES = (ROOT / "README.md", DOCS / "README.md")

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([\w+-]*)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
MD_LINK = re.compile(r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\(\s*<?([^()\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_DEF = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$")
HTML_ATTR = re.compile(r"<[a-zA-Z][^>]*?\s(?:href|src)\s*=\s*[\"']([^\"']+)[\"']")
TN_NAME = re.compile(r"(?<![\w.])tn\.([A-Za-z_]\w*)")
EXTERNAL = re.compile(r"^(?:[a-zA-Z][a-zA-Z0-9+.-]*:|//)")  # http:, https:, mailto:, protocol-relative


# --- parsing ------------------------------------------------------------------------------------------------------

def split_fences(text: str) -> tuple[list[tuple[int, str]], list[tuple[str, str]]]:
    """(prose lines as (line number, text), fenced blocks as (info word, body)); an unclosed fence runs to the end."""
    prose, blocks = [], []
    fence = None  # (marker char, length, info, lines)
    for number, line in enumerate(text.splitlines(), 1):
        m = FENCE.match(line)
        if fence is None:
            if m:
                fence = (m.group(1)[0], len(m.group(1)), m.group(2).lower(), [])
            else:
                prose.append((number, line))
        elif m and m.group(1)[0] == fence[0] and len(m.group(1)) >= fence[1] and not m.group(2):
            blocks.append((fence[2], "\n".join(fence[3])))
            fence = None
        else:
            fence[3].append(line)
    if fence is not None:
        blocks.append((fence[2], "\n".join(fence[3])))
    return prose, blocks


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text (markup and links reduced to their text), lowercased, every character
    but letters, digits, marks, ``-``, ``_`` and spaces dropped, spaces turned into ``-``."""
    text = re.sub(r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\([^)]*\)", r"\1", heading)  # [text](url) -> text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.strip().lower()
    kept = "".join(ch for ch in text if ch in "-_ " or unicodedata.category(ch)[0] in "LNM")
    return kept.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every anchor GitHub makes for the file's headings, repeats numbered ``-1``, ``-2`` …"""
    prose, _ = split_fences(text)
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose:
        m = HEADING.match(line)
        if not m:
            continue
        slug = github_slug(m.group(2))
        if slug in seen:
            seen[slug] += 1
            slug = f"{slug}-{seen[slug]}"
        else:
            seen[slug] = 0
        out.add(slug)
    return out


def links(text: str) -> list[tuple[int, str]]:
    """(line number, target) of every link and image outside code."""
    prose, _ = split_fences(text)
    found = []
    for number, line in prose:
        line = INLINE_CODE.sub(lambda m: " " * len(m.group(0)), line)
        found += [(number, m.group(2)) for m in MD_LINK.finditer(line)]
        m = REF_DEF.match(line)
        if m:
            found.append((number, m.group(1)))
        found += [(number, m.group(1)) for m in HTML_ATTR.finditer(line)]
    return found


# --- the checker ---------------------------------------------------------------------------------------------------

def check_links(page: Path) -> list[str]:
    """One message per broken relative link or anchor in ``page`` (empty when all resolve)."""
    problems = []
    for number, target in links(page.read_text(encoding="utf-8")):
        where = f"{page.name}:{number}: {target!r}"
        if not target:
            problems.append(f"{where}: empty link")
            continue
        if EXTERNAL.match(target):
            continue
        path_part, _, anchor = target.partition("#")
        path_part = unquote(path_part.split("?", 1)[0])
        dest = (page.parent / path_part).resolve() if path_part else page
        if path_part.startswith("/"):
            problems.append(f"{where}: absolute path (links must be relative to the page)")
            continue
        if not dest.exists():
            problems.append(f"{where}: no such file {dest}")
            continue
        if anchor:
            if dest.is_dir() or dest.suffix.lower() != ".md":
                problems.append(f"{where}: an anchor into {dest.name}, which is not a markdown file")
            elif unquote(anchor) not in anchors(dest.read_text(encoding="utf-8")):
                problems.append(f"{where}: no heading with anchor #{anchor} in {dest.name}")
    return problems


def linked_pages(page: Path) -> set[Path]:
    """The markdown files ``page`` links to (resolved paths)."""
    out = set()
    for _, target in links(page.read_text(encoding="utf-8")):
        path_part = unquote(target.partition("#")[0])
        if path_part and not EXTERNAL.match(path_part):
            dest = (page.parent / path_part).resolve()
            if dest.suffix.lower() == ".md":
                out.add(dest)
    return out


def check_python_blocks(page: Path, names: set[str]) -> list[str]:
    """One message per fenced python block that does not parse or uses a ``tn.`` name outside ``names``."""
    problems = []
    _, blocks = split_fences(page.read_text(encoding="utf-8"))
    for i, (info, body) in enumerate(blocks):
        if info not in ("python", "py"):
            continue
        try:
            ast.parse(body)
        except SyntaxError as err:
            problems.append(f"{page.name}: python block {i} does not parse: {err}")
        problems += [f"{page.name}: python block {i} uses tn.{name}, which is not in dir(tellnorm)"
                     for name in sorted(set(TN_NAME.findall(body))) if name not in names]
    return problems


# --- the repository's pages ----------------------------------------------------------------------------------------

def test_there_is_a_manual():
    assert (DOCS / "README.md").exists()
    assert len(PAGES) > 2


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_link_and_anchor_resolves(page):
    assert check_links(page) == []


def test_every_docs_page_is_linked_from_an_index():
    linked = set().union(*(linked_pages(index) for index in INDEXES))
    missing = [str(p.relative_to(ROOT)) for p in DOCS.glob("*.md") if p.resolve() not in linked | {DOCS / "README.md"}]
    assert missing == []
    assert (DOCS / "README.md").resolve() in linked_pages(ROOT / "README.md")


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_python_blocks_use_only_the_real_namespace(page):
    import tellnorm

    assert check_python_blocks(page, set(dir(tellnorm))) == []


def test_the_readme_keeps_the_two_commands_first():
    _, blocks = split_fences((ROOT / "README.md").read_text(encoding="utf-8"))
    first = blocks[0][1].splitlines()
    assert first[0].startswith("make reproduce") and first[1].startswith("make test")
    assert any("import tellnorm as tn" in body for info, body in blocks if info == "python")


# --- the checker itself --------------------------------------------------------------------------------------------

def test_github_slug_rules():
    assert github_slug("What tellnorm found on the organism") == "what-tellnorm-found-on-the-organism"
    assert github_slug("vLLM vs HF: `tellnorm bench backends`") == "vllm-vs-hf-tellnorm-bench-backends"
    assert github_slug("Correctness, tested") == "correctness-tested"
    assert github_slug("The [organism](docs/organism.md) — v2!") == "the-organism--v2"
    assert github_slug("snake_case and ℓ2 norms") == "snake_case-and-ℓ2-norms"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}


def test_checker_accepts_a_good_document(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n## A section\n", encoding="utf-8")
    (tmp_path / "fig.png").write_bytes(b"\x89PNG")
    good = tmp_path / "good.md"
    good.write_text("# Good\n\n## Here, too\n\n[o](other.md) [s](other.md#a-section) [self](#here-too) "
                    "![f](fig.png) [web](https://example.org/x#y) `[code](missing.md)`\n\n"
                    "```bash\n[also code](missing.md)\n```\n", encoding="utf-8")
    assert check_links(good) == []


def test_checker_fails_on_broken_links(tmp_path):
    (tmp_path / "other.md").write_text("# Other page\n\n```\n# hidden in code\n```\n", encoding="utf-8")
    (tmp_path / "fig.png").write_bytes(b"\x89PNG")
    bad = tmp_path / "bad.md"
    bad.write_text("# Bad page\n\n"
                   "[missing file](nowhere.md)\n"
                   "![missing image](figures/none.png)\n"
                   "[missing anchor elsewhere](other.md#no-such-section)\n"
                   "[anchor in a code block](other.md#hidden-in-code)\n"
                   "[missing anchor here](#nope)\n"
                   "[anchor into an image](fig.png#x)\n"
                   "[fine](#bad-page)\n", encoding="utf-8")
    problems = check_links(bad)
    assert len(problems) == 6, problems
    for fragment in ("nowhere.md", "none.png", "#no-such-section", "#hidden-in-code", "#nope", "not a markdown"):
        assert any(fragment in p for p in problems), (fragment, problems)


def test_checker_fails_on_unknown_namespace_names(tmp_path):
    page = tmp_path / "code.md"
    page.write_text("```python\nimport tellnorm as tn\nmodel = tn.load_model('organism')\nx = tn.not_a_name(model)\n"
                    "```\n\n```python\ndef broken(:\n```\n", encoding="utf-8")
    problems = check_python_blocks(page, {"load_model"})
    assert len(problems) == 2, problems
    assert "tn.not_a_name" in problems[0] and "does not parse" in problems[1]


def test_checker_sees_unlinked_pages(tmp_path):
    (tmp_path / "a.md").write_text("[b](b.md) [web](https://example.org/c.md)\n", encoding="utf-8")
    assert linked_pages(tmp_path / "a.md") == {(tmp_path / "b.md").resolve()}
