"""The generation engine: prompts in, streamed text out, for `chat` (and later the server).

It adds to ``generate`` (prefill + KV-cached decode) what a conversation needs:
- the model's chat template (or a plain built-in one for from-scratch models) and a system
  prompt, with the oldest turns dropped when the conversation outgrows the context window;
- EOS ids and stop strings; a stop string is never shown, even in part: text that could still
  turn out to be the start of one is held back until it cannot;
- streaming that never splits a UTF-8 character (``stream_decode``);
- a seed per request.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gptlab.errors import UserError
from gptlab.inference.run import stream_decode
from gptlab.inference.sampling import check_sampling_args, generate
from gptlab.tokenizers.chat_template import chat_config, render_chat

#: for models without a template of their own (gptlab's from-scratch checkpoints): plain text
#: turns, so a model trained on dialogue-shaped text can follow it
BUILTIN_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
BUILTIN_STOPS = ("\nUser:", "\nSystem:")
#: special tokens that end a turn in common chat formats, used when present in the vocabulary
TURN_END_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "</s>")


@dataclass
class SamplingParams:
    temperature: float = 0.7
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int = 256
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    def check(self) -> None:
        check_sampling_args(self.temperature, self.top_k, self.top_p, self.min_p)
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens={self.max_new_tokens} must be at least 1")


@dataclass
class ChatPrompt:
    ids: list[int]
    #: how many of the oldest turns were left out to fit the context window
    dropped_turns: int


class Engine:
    """A loaded model ready to continue prompts and conversations."""

    def __init__(self, checkpoint, device: torch.device | str = "cpu"):
        self.model = checkpoint.model.to(device).eval()
        self.tokenizer = checkpoint.tokenizer
        self.device = torch.device(device)
        self.block_size = checkpoint.config.block_size
        config = chat_config(getattr(checkpoint, "tokenizer_config", None) or Path(checkpoint.path))
        self.template = config.get("chat_template") or BUILTIN_TEMPLATE
        self.template_vars = {k: config.get(k) or "" for k in ("bos_token", "eos_token")}
        specials = self.tokenizer.special_tokens
        eos_names = {config.get("eos_token"), *TURN_END_TOKENS}
        self.eos_ids = {specials[n] for n in eos_names if n in specials}
        self.default_stops = BUILTIN_STOPS if self.template is BUILTIN_TEMPLATE else ()

    # --- prompts ------------------------------------------------------------------------------

    def chat_prompt(self, messages: list[dict[str, str]], max_new_tokens: int) -> ChatPrompt:
        """Render the conversation for the model; drop the oldest turns (after any system
        message) until it leaves room for the answer in the context window. The room kept is
        ``max_new_tokens`` but at most half the window: a longer answer still completes, as
        generation slides its window along past the end."""
        system = [m for m in messages[:1] if m["role"] == "system"]
        turns = messages[len(system):]
        budget = self.block_size - min(max_new_tokens, self.block_size // 2)
        for dropped in range(len(turns)):
            text = render_chat(self.template, system + turns[dropped:], add_generation_prompt=True,
                               **self.template_vars)
            ids = self.tokenizer.encode(text, allowed_special="all")
            if len(ids) <= budget:
                return ChatPrompt(ids, dropped)
        raise UserError(f"the last message alone needs more than {budget} tokens of the model's {self.block_size}; "
                        "shorten it or lower the answer length")

    # --- generation ---------------------------------------------------------------------------

    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[str]:
        """Yield the continuation of ``prompt_ids`` as text pieces until EOS, a stop string or
        ``max_new_tokens``."""
        params.check()
        if not prompt_ids:
            raise UserError("the prompt is empty")
        generator = torch.Generator(device=self.device)
        generator.manual_seed(params.seed) if params.seed is not None else generator.seed()
        stops = tuple(params.stop) + self.default_stops
        idx = torch.tensor([prompt_ids], device=self.device)

        def token_ids() -> Iterator[int]:
            with torch.no_grad():
                for t in generate(self.model, idx, params.max_new_tokens, temperature=params.temperature,
                                  top_k=params.top_k, top_p=params.top_p, min_p=params.min_p, generator=generator,
                                  repetition_penalty=params.repetition_penalty):
                    if int(t[0]) in self.eos_ids:
                        return
                    yield int(t[0])

        pending = ""  # text not yet shown because it may be the start of a stop string
        for piece in stream_decode(self.tokenizer, token_ids()):
            pending += piece
            hit = min((i for i in (pending.find(s) for s in stops) if i != -1), default=-1)
            if hit != -1:
                if hit:
                    yield pending[:hit]
                return
            safe = len(pending) - _longest_stop_prefix(pending, stops)
            if safe:
                yield pending[:safe]
                pending = pending[safe:]
        if pending:
            yield pending


def _longest_stop_prefix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
