"""The guided tour in docs/ runs, so it cannot rot.

Every ```python block of a chapter runs, in order, in one fresh namespace (a later block uses
the variables of an earlier one), with the working directory a temporary folder and
``GPTLAB_CACHE`` at the normal cache (so a corpus fetched once is reused). A block followed
directly by an ```output block must print that text, decimals within 2% or 0.005 (losses differ
in their last digits between machines); ``python tests/test_docs.py docs/NN-name.md`` rewrites those
blocks from a fresh run. ```bash and ```text blocks are shown, not run.
The links of every page must lead to files that exist, and a link whose text names a function
or class (`GPT.forward`) must lead to the file that defines it.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = sorted(DOCS.glob("*.md"))
CHAPTERS = [p for p in PAGES if p.name != "README.md"]
#: a fenced block: its language, what follows the language on the fence line, and its body
#: (fences at the start of a line, as the tour writes them)
FENCE = re.compile(r"^```(\w*)([^\n]*)\n(.*?)^```$", re.S | re.M)
#: an output block's own tolerance, ```output drift=10%: for figures of a short training run,
#: which take another path on each CPU's fp32 sums (see ``same_output``)
DRIFT = re.compile(r"\bdrift=(\d+)%")
#: a markdown link [text](target), the target without a URL scheme or an in-page anchor alone
LINK = re.compile(r"\[([^\]]+)\]\(([^)#:\s]+)(#[^)]*)?\)")
#: a decimal number in printed output
DECIMAL = re.compile(r"-?\d+\.\d+")
#: the tour's pictures are committed, so each must stay small
MAX_IMAGE_BYTES = 200_000


def blocks(page: Path) -> list[tuple[str, int, str, str]]:
    """(language, line number of the first code line, body, the fence line after the language)
    of every fenced block of ``page``."""
    text = page.read_text(encoding="utf-8")
    return [(m.group(1), text.count("\n", 0, m.start(3)) + 1, m.group(3), m.group(2))
            for m in FENCE.finditer(text)]


def test_the_tour_has_its_chapters():
    assert len(CHAPTERS) >= 14, [p.name for p in CHAPTERS]
    toc = (DOCS / "README.md").read_text(encoding="utf-8")
    for chapter in CHAPTERS:
        assert f"({chapter.name})" in toc, f"docs/README.md does not link to {chapter.name}"
        assert any(lang == "python" for lang, *_ in blocks(chapter)), f"{chapter.name} has no python block"


def same_output(printed: str, shown: str, drift: float = 0.02) -> bool:
    """Whether ``printed`` matches ``shown``: the same text, and decimals within ``drift`` (2%) of
    each other, or 0.005 apart. The tour pins fp32, but fp32 itself sums in another order on an
    AVX-512 CPU than on an AVX2 one, and a short run drifts by about 1%. A block whose figures come
    from a short training run near its floor drifts more, and says so on its fence (``DRIFT``):
    chapter 14's loss at step 200 read 0.1255 on AVX2, 0.1225 on an Intel AVX-512 CPU and 0.1339
    on an AMD AVX-512 one (7%)."""
    printed, shown = printed.rstrip(), shown.rstrip()
    if DECIMAL.split(printed) != DECIMAL.split(shown):
        return False
    pairs = zip(map(float, DECIMAL.findall(printed)), map(float, DECIMAL.findall(shown)))
    return all(abs(a - b) <= max(drift * max(abs(a), abs(b)), 0.005) for a, b in pairs)


def run_chapter(chapter: Path) -> list[tuple[int, str, str | None, float]]:
    """Run the python blocks of ``chapter`` in the current directory: for each, its line, what
    it printed, the body of the output block that follows it (None if there is none) and that
    block's tolerance (``DRIFT``, else 2%)."""
    namespace: dict = {"__name__": f"docs_{chapter.stem}"}
    found = blocks(chapter)
    results = []
    for i, (lang, line, body, _) in enumerate(found):
        if lang != "python":
            continue
        # Padding with newlines makes a traceback name the markdown file and its line.
        code = compile("\n" * (line - 1) + body, str(chapter), "exec")
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(code, namespace)
        following = found[i + 1] if i + 1 < len(found) else None
        shown = following if following and following[0] == "output" else None
        drift = DRIFT.search(shown[3]) if shown else None
        results.append((line, printed.getvalue(), shown and shown[2], int(drift.group(1)) / 100 if drift else 0.02))
    return results


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_chapter_runs(chapter: Path, tmp_path, monkeypatch, one_thread):
    from gptlab.cache import cache_dir

    monkeypatch.setenv("GPTLAB_CACHE", str(cache_dir()))
    monkeypatch.chdir(tmp_path)
    for line, printed, shown, drift in run_chapter(chapter):
        if shown is not None:
            assert same_output(printed, shown, drift), \
                f"{chapter.name}:{line}: the block printed\n{printed}\nbut its output block shows\n{shown}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.stem)
def test_links_lead_somewhere(page: Path):
    text = page.read_text(encoding="utf-8")
    for label, target, _anchor in LINK.findall(text):
        path = (page.parent / target).resolve()
        assert path.exists(), f"{page.name}: the link [{label}]({target}) leads nowhere"
        if path.suffix in (".png", ".jpg"):
            assert path.stat().st_size <= MAX_IMAGE_BYTES, f"{target} is over {MAX_IMAGE_BYTES:,} bytes"
        name = re.fullmatch(r"`([A-Za-z_][\w.]*)`", label)
        if name and path.suffix == ".py":
            source = path.read_text(encoding="utf-8")
            for part in name.group(1).split("."):  # `GPT.forward`: both GPT and forward
                defined = re.search(rf"^\s*(def|class) {part}\b|^{part}\b\s*[:=]", source, re.M)
                assert defined, f"{page.name}: {part} of {label} is not defined in {target}"


if __name__ == "__main__":
    # python tests/test_docs.py docs/NN-name.md ...: run each chapter in a temporary folder and
    # write what its blocks print into their output blocks (review the diff before committing).
    import os
    import sys
    import tempfile

    torch.set_num_threads(1)
    for chapter in [Path(arg).resolve() for arg in sys.argv[1:]]:
        with tempfile.TemporaryDirectory() as tmp:
            os.chdir(tmp)
            outputs = {line: printed for line, printed, shown, _ in run_chapter(chapter) if shown is not None}
        text = chapter.read_text(encoding="utf-8")
        pieces, end = [], 0
        for lang, line, *_ in blocks(chapter):
            if lang == "python" and line in outputs:
                match = next(m for m in FENCE.finditer(text, end) if m.group(1) == "output")
                pieces += [text[end:match.start(3)], outputs[line].rstrip() + "\n"]
                end = match.end(3)
        chapter.write_text("".join(pieces) + text[end:], encoding="utf-8")
        print(f"updated {chapter}")
