"""The one train/validation/test split of every named source, decided by a hash.

An item's split is a function of a stable id alone (a document's sha256, a conversation's id, a
message's text): it never depends on the order items are read in, on a seed, or on which other
items exist. So the split is the same on every machine and in every version of gptlab, a
document shared by two corpora (``austen`` and ``english``) falls in the same split in both, and
duplicated texts never straddle train and test.

The rule: take the first 8 bytes of the id's sha256 as a fraction f in [0, 1); f < 0.8 is
train, f < 0.9 validation, the rest test.
"""

from __future__ import annotations

import hashlib

SPLITS = ("train", "validation", "test")
#: where train and validation end in the hash range [0, 1); test takes the rest
BOUNDS = (0.8, 0.9)


def split_of_digest(sha256_hex: str) -> str:
    """The split of an item whose id has this sha256 (hex)."""
    value = int(sha256_hex[:16], 16)  # compared as integers: as a float, f could round up to 1.0
    return next((name for name, bound in zip(SPLITS, BOUNDS) if value < int(bound * 2**64)), SPLITS[-1])


def split_of(stable_id: str) -> str:
    """The split of the item with this id (hashed as UTF-8)."""
    return split_of_digest(hashlib.sha256(stable_id.encode("utf-8")).hexdigest())

#: the rule in one line, recorded with every dataset written
SPLIT_RULE = "train 80% / validation 10% / test 10%, by the sha256 of each item's stable id (gptlab.data.splits)"
