"""Synthetic chat data made by code (``gptlab.inference.exact_match`` tests a model on it).

Every answer is computed (``23 + 45`` is added, ``strawberry``'s r's are counted), so it is
correct, and it is short and formulaic ("23 + 45 = 68."), so a small model trained from scratch
can learn the pattern and an exact string comparison is a fair test. Nine kinds of question,
each with several phrasings: arithmetic, counting letters, spelling, comparing numbers, unit
conversions, days and months, a small table of facts, greetings, and the assistant itself.

The held-out split is fixed by content, not by position or seed: each question has a ``key``
and a hash of ``kind|key`` puts it in ``test`` or ``train``. Where the answer can be worked out
from the question (sums and differences, counting, spelling, comparing, metric conversions) the
key is the problem itself ("+ 23 45"), so a test problem is never seen in training under any
phrasing. Where the answer is a fact to remember (the times table, 60 minutes an hour, days,
capitals, greetings, the assistant's name) no model can work out one it was never told, so the
key is the whole normalised question: the fact is taught, and the test asks it in a phrasing
never seen. Phrasings are built from parts (an optional opening such as "Quick question: ", one
of several cores, an optional " please"), so a held-out phrasing is a new combination of parts
each of which training shows. Whatever ``n`` and ``seed``, no test question appears in training.

The model-facing format is gptlab's built-in chat template (``BUILTIN_TEMPLATE``):
``User: ...\\nAssistant: ...\\n``, with an optional ``System: ...`` line first.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gptlab.cache import atomic_path
from gptlab.errors import UserError
from gptlab.tokenizers.chat_template import BUILTIN_TEMPLATE, render_chat

SPLITS = ("train", "test")
#: share of question keys (in percent) that belong to the test split
TEST_PERCENT = 15
ASSISTANT_NAME = "Sprout"
#: chat shapes: share of conversations with a system prompt, and with more than one exchange
SYSTEM_SHARE = 0.25
MULTI_TURN_SHARE = 0.3
SYSTEM_PROMPTS = (
    f"You are {ASSISTANT_NAME}, a helpful assistant.",
    "You are a helpful assistant.",
    "Answer briefly.",
    "You are a small assistant. Keep your answers short.",
)

# --- difficulty: the ranges of the numbers asked about ------------------------------------------
ADD_MAX = 30          # a + b with a, b in 0..ADD_MAX
SUB_MAX = 30          # a - b with 0 <= b <= a <= SUB_MAX (never negative)
MUL_MAX = 9           # a * b with a, b in 0..MUL_MAX
COMPARE_MAX = 99      # two different numbers in 0..COMPARE_MAX
UNIT_MAX = 10         # conversions of 1..UNIT_MAX of the larger unit

# --- the tables the closed kinds draw on ------------------------------------------------------
WORDS = (
    "apple", "banana", "cherry", "grape", "lemon", "orange", "peach", "melon", "berry", "strawberry",
    "cat", "dog", "horse", "mouse", "rabbit", "tiger", "zebra", "monkey", "sheep", "goat",
    "bird", "eagle", "parrot", "duck", "fish", "shark", "whale", "frog", "snake", "turtle",
    "house", "door", "window", "table", "chair", "bed", "lamp", "clock", "mirror", "carpet",
    "book", "pencil", "paper", "letter", "school", "teacher", "student", "lesson", "number", "answer",
    "water", "river", "ocean", "island", "mountain", "valley", "forest", "garden", "flower", "tree",
    "sun", "moon", "star", "cloud", "rain", "snow", "storm", "winter", "summer", "spring",
    "red", "blue", "green", "yellow", "purple", "silver", "golden", "happy", "little", "pink",
    "bread", "butter", "cheese", "coffee", "cookie", "dinner", "pepper", "potato", "tomato", "sugar",
    "car", "train", "bottle", "rocket", "bicycle", "engine", "wheel", "street", "bridge", "tunnel",
    "music", "guitar", "piano", "drum", "song", "dance", "game", "ball", "puzzle", "picture",
    "friend", "family", "mother", "father", "sister", "brother", "baby", "people", "person", "king",
    "queen", "castle", "dragon", "knight", "sword", "wizard", "magic", "giant", "kitten", "puppy",
    "hello", "goodbye", "banner", "pizza", "balloon", "candle", "jelly", "button", "pillow", "ladder",
    "basket", "bucket", "camera", "jacket", "kettle", "marble", "needle", "pocket", "bubble", "saddle",
    "spoon", "fork", "knife", "plate", "cup", "glass", "honey", "salad", "soup", "noodle",
    "wolf", "bear", "fox", "camel", "lizard", "spider", "beetle", "owl", "goose", "llama",
    "blanket", "closet", "kitchen", "garage", "roof", "wall", "floor", "stairs", "village", "city",
    "ticket", "wallet", "hammer", "nail", "rope", "shovel", "helmet", "boot", "glove", "scarf",
)
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")
MONTH_DAYS = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "England": "London", "Ireland": "Dublin", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki",
    "Denmark": "Copenhagen", "Poland": "Warsaw", "Austria": "Vienna", "Greece": "Athens", "Egypt": "Cairo",
    "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Russia": "Moscow", "Canada": "Ottawa",
    "Mexico": "Mexico City", "Peru": "Lima", "Kenya": "Nairobi", "Australia": "Canberra", "Turkey": "Ankara",
}
ANIMAL_SOUNDS = {
    "cow": "moo", "dog": "woof", "cat": "meow", "duck": "quack", "sheep": "baa", "pig": "oink",
    "horse": "neigh", "owl": "hoot", "lion": "roar", "frog": "ribbit", "mouse": "squeak", "bee": "buzz",
    "snake": "hiss", "rooster": "cock-a-doodle-doo", "donkey": "hee-haw",
}
COLOURS = {
    "the sky": "blue", "grass": "green", "snow": "white", "a banana": "yellow", "coal": "black",
    "a tomato": "red", "a carrot": "orange", "milk": "white", "the sun": "yellow", "a lemon": "yellow",
    "chocolate": "brown", "a frog": "green", "a strawberry": "red", "the sea": "blue", "a crow": "black",
    "an orange": "orange",
}


@dataclass(frozen=True)
class QA:
    """One question, its one correct answer, and what decides its split."""

    kind: str
    question: str
    answer: str
    #: the problem for worked-out answers ("+ 23 45"), the normalised question for remembered ones
    key: str
    #: "problem" (no phrasing of a test problem is trained on) or "phrasing" (the fact is taught)
    held_out: str = "problem"

    @property
    def split(self) -> str:
        digest = hashlib.sha256(f"{self.kind}|{self.key}".encode()).digest()
        return "test" if int.from_bytes(digest[:8], "big") % 100 < TEST_PERCENT else "train"


def normalise(question: str) -> str:
    """Lower case, letters, digits and arithmetic signs only, single spaces: the surface form
    (capitals, punctuation) forgotten, the content kept."""
    return " ".join(re.sub(r"[^a-z0-9+*=-]+", " ", question.lower()).split())


#: optional openings and the share of questions that get one; "" is the plain question
OPENINGS = ("Hey, ", "Hi, ", "So, ", "Quick question: ", "Please tell me: ", "Excuse me, ", "I wonder, ")
OPENING_SHARE = 0.5
#: share of questions that end in " please" before their final mark
PLEASE_SHARE = 0.25
#: greetings take their own, short openings
GREETING_OPENINGS = ("Oh, ", "Well, ", "Um, ", "Okay, ", "Ah, ")


def dress(rng: random.Random, qa: QA) -> QA:
    """``qa`` with, sometimes, an opening before its question and " please" before the question's
    final mark (greetings take their own openings and no " please"); a remembered fact's key
    becomes the whole dressed question, so the split holds out combinations of parts."""
    greeting = qa.kind == "greeting"
    q = qa.question
    if rng.random() < OPENING_SHARE:
        q = rng.choice(GREETING_OPENINGS if greeting else OPENINGS) + q[0].lower() + q[1:]
    if not greeting and rng.random() < PLEASE_SHARE:
        q = q[:-1] + " please" + q[-1]
    return replace(qa, question=q, key=normalise(q) if qa.held_out == "phrasing" else qa.key)


def _closed(kind: str, question: str, answer: str) -> QA:
    """A remembered fact: the test split holds out phrasings of it (see ``dress``), never the fact."""
    return QA(kind, question, answer, normalise(question), "phrasing")


def _times(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


# --- one generator per kind: (rng) -> QA ----------------------------------------------------------

ARITHMETIC = {
    "+": (("What is {a} + {b}?", "What is {a} plus {b}?", "Add {a} and {b}.", "Calculate {a} + {b}.",
           "How much is {a} plus {b}?", "{a} + {b} = ?"), lambda a, b: a + b),
    "-": (("What is {a} - {b}?", "What is {a} minus {b}?", "Subtract {b} from {a}.", "Calculate {a} - {b}.",
           "How much is {a} minus {b}?", "{a} - {b} = ?"), lambda a, b: a - b),
    "*": (("What is {a} * {b}?", "What is {a} times {b}?", "Multiply {a} by {b}.", "Calculate {a} * {b}.",
           "How much is {a} times {b}?", "{a} * {b} = ?"), lambda a, b: a * b),
}


def arithmetic(rng: random.Random) -> QA:
    op = rng.choice(tuple(ARITHMETIC))
    if op == "+":
        a, b = rng.randint(0, ADD_MAX), rng.randint(0, ADD_MAX)
    elif op == "-":
        a = rng.randint(0, SUB_MAX)
        b = rng.randint(0, a)
    else:
        a, b = rng.randint(0, MUL_MAX), rng.randint(0, MUL_MAX)
    phrasings, fn = ARITHMETIC[op]
    question, answer = rng.choice(phrasings).format(a=a, b=b), f"{a} {op} {b} = {fn(a, b)}."
    # Sums and differences can be worked out digit by digit; the times table is remembered.
    return _closed("arithmetic", question, answer) if op == "*" else QA("arithmetic", question, answer, f"{op} {a} {b}")


def letters(rng: random.Random) -> QA:
    word = rng.choice(WORDS)
    # Mostly a letter of the word; sometimes one it lacks, so "0 times" is learnt too.
    pool = word if rng.random() < 0.8 else [c for c in "abcdefghijklmnopqrstuvwxyz" if c not in word]
    letter = rng.choice(pool)
    question = rng.choice(("How many times does the letter {l} appear in {w}?", "How many {l}'s are in {w}?",
                           "Count the letter {l} in {w}.", "How many times does {l} occur in the word {w}?",
                           "In the word {w}, how many {l}'s are there?")).format(l=letter, w=word)
    answer = f"{word} has the letter {letter} {_times(word.count(letter), 'time', 'times')}."
    return QA("letters", question, answer, f"{letter} {word}")


def spelling(rng: random.Random) -> QA:
    word = rng.choice(WORDS)
    question = rng.choice(("How do you spell {w}?", "Spell {w}.", "Spell the word {w}.", "Can you spell {w}?",
                           "Spell {w} letter by letter.")).format(w=word)
    return QA("spelling", question, f"{word} is spelled {'-'.join(word)}.", word)


def compare(rng: random.Random) -> QA:
    a, b = rng.sample(range(COMPARE_MAX + 1), 2)
    lo, hi = min(a, b), max(a, b)
    form = rng.choice(("bigger", "smaller", "yes/no"))
    # "Which is bigger, a or b?" has the same answer as "..., b or a?": one problem, one key.
    key = f"{form} {a} {b}" if form == "yes/no" else f"{form} {lo} {hi}"
    if form == "bigger":
        question = rng.choice(("Which is bigger, {a} or {b}?", "Which number is larger: {a} or {b}?",
                               "What is the bigger number, {a} or {b}?"))
        answer = f"{hi} is bigger than {lo}."
    elif form == "smaller":
        question = rng.choice(("Which is smaller, {a} or {b}?", "Which number is less: {a} or {b}?",
                               "What is the smaller number, {a} or {b}?"))
        answer = f"{lo} is smaller than {hi}."
    else:
        question = rng.choice(("Is {a} bigger than {b}?", "Is {a} greater than {b}?", "Is {a} more than {b}?"))
        answer = f"Yes, {a} is bigger than {b}." if a > b else f"No, {a} is smaller than {b}."
    return QA("compare", question.format(a=a, b=b), answer, key)


#: (larger unit, its plural, smaller unit, its plural, how many smaller units make one larger)
UNITS = (
    ("kilometer", "kilometers", "meter", "meters", 1000),
    ("meter", "meters", "centimeter", "centimeters", 100),
    ("centimeter", "centimeters", "millimeter", "millimeters", 10),
    ("kilogram", "kilograms", "gram", "grams", 1000),
    ("liter", "liters", "milliliter", "milliliters", 1000),
    ("hour", "hours", "minute", "minutes", 60),
    ("minute", "minutes", "second", "seconds", 60),
    ("day", "days", "hour", "hours", 24),
    ("week", "weeks", "day", "days", 7),
    ("year", "years", "month", "months", 12),
)


def units(rng: random.Random) -> QA:
    big, bigs, small, smalls, factor = rng.choice(UNITS)
    x = rng.randint(1, UNIT_MAX)
    y = x * factor
    if rng.random() < 0.5:  # larger to smaller
        question = rng.choice(("How many {smalls} are in {xb}?", "Convert {xb} to {smalls}.",
                               "{xb} is how many {smalls}?"))
        answer, key = f"{_times(x, big, bigs)} = {_times(y, small, smalls)}.", f"{big}>{small} {x}"
    else:  # smaller to larger, always a whole number
        question = rng.choice(("How many {bigs} is {ys}?", "Convert {ys} to {bigs}.", "{ys} is how many {bigs}?"))
        answer, key = f"{_times(y, small, smalls)} = {_times(x, big, bigs)}.", f"{small}>{big} {y}"
    question = question.format(smalls=smalls, bigs=bigs, xb=_times(x, big, bigs), ys=_times(y, small, smalls))
    # A power of ten only moves zeros, which can be worked out; 7 hours = 420 minutes is remembered.
    return QA("units", question, answer, key) if factor in (10, 100, 1000) else _closed("units", question, answer)


def calendar(rng: random.Random) -> QA:
    form = rng.choice(("day after", "day before", "month after", "month before", "days in month", "totals"))
    if form in ("day after", "day before", "month after", "month before"):
        unit, where = form.split()
        names = WEEKDAYS if unit == "day" else MONTHS
        i = rng.randrange(len(names))
        other = names[(i + (1 if where == "after" else -1)) % len(names)]
        verb = "follows" if where == "after" else "comes just before"
        question = rng.choice((f"What {unit} comes {where} {{x}}?", f"What is the {unit} {where} {{x}}?",
                               f"Which {unit} {verb} {{x}}?", f"Tell me the {unit} {where} {{x}}."))
        return _closed("calendar", question.format(x=names[i]), f"The {unit} {where} {names[i]} is {other}.")
    if form == "days in month":
        i = rng.randrange(12)
        month = MONTHS[i]
        question = rng.choice(("How many days are in {m}?", "How many days does {m} have?",
                               "How long is {m} in days?", "How many days are there in {m}?")).format(m=month)
        answer = (f"{month} has 28 days, or 29 in a leap year." if month == "February"
                  else f"{month} has {MONTH_DAYS[i]} days.")
        return _closed("calendar", question, answer)
    what, whole, answer = rng.choice((("days", "week", "A week has 7 days."),
                                      ("months", "year", "A year has 12 months."),
                                      ("days", "year", "A year has 365 days, or 366 in a leap year."),
                                      ("hours", "day", "A day has 24 hours.")))
    question = rng.choice(("How many {w} are in a {b}?", "How many {w} does a {b} have?",
                           "How many {w} are there in a {b}?", "A {b} has how many {w}?")).format(w=what, b=whole)
    return _closed("calendar", question, answer)


def facts(rng: random.Random) -> QA:
    table = rng.choice(("capital", "sound", "colour"))
    if table == "capital":
        country = rng.choice(sorted(CAPITALS))
        question = rng.choice(("What is the capital of {x}?", "What's the capital of {x}?",
                               "Which city is the capital of {x}?", "Name the capital of {x}.",
                               "What city is the capital of {x}?"))
        answer = f"The capital of {country} is {CAPITALS[country]}."
        return _closed("facts", question.format(x=country), answer)
    if table == "sound":
        animal = rng.choice(sorted(ANIMAL_SOUNDS))
        question = rng.choice(("What sound does a {x} make?", "What does a {x} say?", "What noise does a {x} make?",
                               "How does a {x} sound?"))
        return _closed("facts", question.format(x=animal), f"A {animal} says {ANIMAL_SOUNDS[animal]}.")
    thing = rng.choice(sorted(COLOURS))
    question = rng.choice(("What colour is {x}?", "What color is {x}?", "Which colour is {x}?",
                           "What is the colour of {x}?"))
    return _closed("facts", question.format(x=thing), f"{thing[0].upper()}{thing[1:]} is {COLOURS[thing]}.")


#: closed kinds whose questions are whole sentences: (phrasings, the one answer)
GREETINGS = (
    (("Hello!", "Hi!", "Hey!", "Hi there!", "Hello there!", "Hey there!"), "Hello! How can I help you?"),
    (("Good morning!", "Good morning to you!", "Morning!"), "Good morning! How can I help you?"),
    (("Good evening!", "Good evening to you!", "Evening!"), "Good evening! How can I help you?"),
    (("How are you?", "How are you doing?", "How's it going?", "How are things?"),
     "I am well, thank you. How can I help you?"),
    (("Thank you!", "Thanks!", "Thanks a lot!", "Thank you very much!", "Many thanks!"), "You're welcome!"),
    (("Goodbye!", "Bye!", "See you later!", "Bye for now!", "See you soon!"), "Goodbye! Have a nice day."),
)
IDENTITY = (
    (("What is your name?", "What's your name?", "Tell me your name.", "What should I call you?",
      "What are you called?", "Do you have a name?", "How should I call you?"), f"My name is {ASSISTANT_NAME}."),
    (("Who are you?", "What are you?", "Tell me about yourself.", "Introduce yourself.", "Who am I talking to?",
      "Say who you are."),
     f"I am {ASSISTANT_NAME}, a small language model."),
    (("Who made you?", "Who created you?", "Who built you?", "Who trained you?", "Where do you come from?"),
     "I was grown from scratch with gptlab."),
    (("What can you do?", "How can you help me?", "What are you good at?", "What do you know?",
      "What can you help me with?"),
     "I can do sums, spell words, count letters, compare numbers and convert units."),
    (("Are you a human?", "Are you a person?", "Are you a robot?", "Are you real?"),
     f"No, I am {ASSISTANT_NAME}, a small language model."),
)


def _from_table(kind: str, table: tuple[tuple[tuple[str, ...], str], ...]) -> Callable[[random.Random], QA]:
    def make(rng: random.Random) -> QA:
        phrasings, answer = rng.choice(table)
        return _closed(kind, rng.choice(phrasings), answer)
    return make


#: kind -> (generator, relative weight in the training mix)
KINDS: dict[str, tuple[Callable[[random.Random], QA], float]] = {
    "arithmetic": (arithmetic, 3.0),
    "letters": (letters, 2.0),
    "spelling": (spelling, 1.0),
    "compare": (compare, 1.5),
    "units": (units, 2.0),
    "calendar": (calendar, 1.0),
    "facts": (facts, 1.0),
    "greeting": (_from_table("greeting", GREETINGS), 0.5),
    "identity": (_from_table("identity", IDENTITY), 0.5),
}


def _vary_surface(rng: random.Random, qa: QA) -> QA:
    """Sometimes lower-case the first letter or drop the final punctuation, as people type; the
    key (and so the split) is unchanged, since a problem's key ignores the wording and a
    phrasing's key is normalised."""
    q = qa.question
    if rng.random() < 0.1:
        q = q[0].lower() + q[1:]
    if rng.random() < 0.1 and q[-1] in "?.!":
        q = q[:-1]
    return replace(qa, question=q)


def sample_qa(rng: random.Random, split: str, kind: str | None = None) -> QA:
    """One question of ``split`` (of ``kind``, or of a kind drawn by the training weights)."""
    if kind is None:
        kind = rng.choices(list(KINDS), weights=[w for _, w in KINDS.values()])[0]
    make = KINDS[kind][0]
    for _ in range(10_000):  # rejection: draw until the question falls in the split
        qa = dress(rng, make(rng))
        if qa.split == split:
            return _vary_surface(rng, qa)
    raise RuntimeError(f"kind {kind!r} has no {split} questions; change TEST_PERCENT or its tables")


def _check(split: str, n: int) -> None:
    problems = []
    if split not in SPLITS:
        problems.append(f"split {split!r} must be one of {', '.join(SPLITS)}")
    if not isinstance(n, int) or n < 1:
        problems.append(f"n={n!r} must be a whole number >= 1")
    if problems:
        raise UserError("synthetic chat: " + "; ".join(problems))


def synth_conversations(split: str = "train", n: int = 10_000, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` conversations ``{"messages": [{"role": ..., "content": ...}, ...]}`` of ``split``;
    the same ``split``, ``n`` and ``seed`` give the same list, and a larger ``n`` extends it."""
    _check(split, n)
    rng = random.Random(f"gptlab-synth-chat:{split}:{seed}")
    conversations = []
    for _ in range(n):
        messages = [{"role": "system", "content": rng.choice(SYSTEM_PROMPTS)}] if rng.random() < SYSTEM_SHARE else []
        exchanges = rng.choice((2, 3)) if rng.random() < MULTI_TURN_SHARE else 1
        for _ in range(exchanges):
            qa = sample_qa(rng, split)
            messages += [{"role": "user", "content": qa.question}, {"role": "assistant", "content": qa.answer}]
        conversations.append({"messages": messages})
    return conversations


def write_synth_chat(out: Path, split: str = "train", n: int = 10_000, seed: int = 0) -> int:
    """Write ``synth_conversations(split, n, seed)`` to ``out`` as chat JSONL (one conversation a
    line), atomically; returns the number of conversations written."""
    conversations = synth_conversations(split, n, seed)
    with atomic_path(out) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for conversation in conversations:
                f.write(json.dumps(conversation, ensure_ascii=False) + "\n")
    return len(conversations)


def render_plain(messages: list[dict[str, str]]) -> str:
    """A conversation as the built-in template shows it to a model: ``User: ...\\nAssistant: ...\\n``."""
    return render_chat(BUILTIN_TEMPLATE, messages)


def synth_text(n: int = 10_000, seed: int = 0) -> str:
    """``n`` training conversations as plain text for pretraining, a blank line between two."""
    return "\n".join(render_plain(c["messages"]) for c in synth_conversations("train", n, seed))


# --- held-out questions, for exact-match evaluation ------------------------------------------------

def held_out_questions(n: int = 200, seed: int = 0) -> list[QA]:
    """``n`` single test questions, the kinds taken in turn so each is asked about equally often."""
    _check("test", n)
    rng = random.Random(f"gptlab-synth-eval:{seed}")
    kinds = list(KINDS)
    return [sample_qa(rng, "test", kinds[i % len(kinds)]) for i in range(n)]
