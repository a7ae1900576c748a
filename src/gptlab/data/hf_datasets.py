"""``hf:DATASET[:CONFIG][:SPLIT]``: a Hugging Face dataset streamed as a corpus, row by row.

``hf:HuggingFaceFW/fineweb-edu:sample-10BT`` streams the 10B-token sample of FineWeb-Edu (its
``train`` split) through the ``datasets`` library (``pip install "gptlab[data]"``), without
downloading it whole first; each row's ``text`` field (or ``text_column``) is a document. For a
long preparation, downloading the Parquet files once and preparing from them is sturdier: a
restarted ``gptlab prepare`` then reads from disk what it skips, instead of streaming it again.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from gptlab.data.readers import Document, optional_module
from gptlab.errors import UserError

PREFIX = "hf:"


@dataclass(frozen=True)
class HFDataset:
    """Which dataset, configuration and split ``hf:DATASET[:CONFIG][:SPLIT]`` names."""

    spec: str
    path: str
    config: str | None
    split: str

    @classmethod
    def parse(cls, spec: str) -> HFDataset:
        path, *rest = spec[len(PREFIX):].split(":")
        if not path or len(rest) > 2:
            raise UserError(f"--corpus {spec!r}: expected hf:DATASET, hf:DATASET:CONFIG or hf:DATASET:CONFIG:SPLIT, "
                            "such as hf:HuggingFaceFW/fineweb-edu:sample-10BT")
        config = rest[0] if rest and rest[0] else None
        return cls(spec, path, config, rest[1] if len(rest) == 2 and rest[1] else "train")

    def _stream(self):
        datasets = optional_module("datasets", f"--corpus {self.spec}")
        try:
            return datasets.load_dataset(self.path, self.config, split=self.split, streaming=True)
        except Exception as e:  # offline, unknown dataset, config or split: the library's own words
            raise UserError(f"cannot stream {self.spec} from the Hugging Face Hub: {e}") from None

    def known_documents(self) -> int | None:
        """The number of rows the dataset's card declares for the split, if it declares one."""
        try:
            return int(self._stream().info.splits[self.split].num_examples) or None
        except (AttributeError, KeyError, TypeError):
            return None

    def documents(self, text_column: str = "text") -> Iterator[Document]:
        for n, row in enumerate(self._stream()):
            text = row.get(text_column) if isinstance(row, dict) else None
            if text is None and (not isinstance(row, dict) or text_column not in row):
                have = ", ".join(row) if isinstance(row, dict) else type(row).__name__
                raise UserError(f"{self.spec}: row {n} has no field {text_column!r} (it has {have}); choose one "
                                "with --text-column")
            if not isinstance(text, (str, type(None))):
                raise UserError(f"{self.spec}: field {text_column!r} of row {n} is not text; choose a text field "
                                "with --text-column")
            yield iter((text,) if text else ())  # an empty row still counts, as in the card's number of rows
