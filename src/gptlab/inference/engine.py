"""The generation engine: prompts in, streamed text out, for `chat`, the server and batches.

It adds to ``generate`` (prefill + KV-cached decode) what a conversation needs:
- the model's chat template (or a plain built-in one for from-scratch models) and a system
  prompt, with the oldest turns dropped when the conversation outgrows the context window;
- the BOS token in front of every prompt of a model that reads one (``encode_prompt``);
- EOS ids and stop strings; a stop string is never shown, even in part: text that could still
  turn out to be the start of one is held back until it cannot;
- streaming that never splits a UTF-8 character;
- a seed per request (or one generator that several requests draw from in turn);
- a ``Completion`` for every answer: its text, the ids the model generated and why it stopped
  ("stop" or "length"), so token counts are exact;
- several prompts of different lengths in one batch (``generate_batch``), left-padded, each
  stopping on its own;
- optionally, int8 weights (``quantize="int8"``, see ``gptlab.inference.quantize``) and a
  compiled decode step over a static KV cache (``compile=True``, see
  ``gptlab.inference.compiled_decode``).
"""

from __future__ import annotations

import codecs
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field

import torch

from gptlab.device import pick_dtype
from gptlab.errors import UserError
from gptlab.inference.compiled_decode import compile_decode
from gptlab.inference.quantize import checkpoint_calibration, quantize_int8
from gptlab.inference.sampling import check_sampling_args, generate
from gptlab.inference.speculative import SpeculationStats, generate_speculative
from gptlab.tokenizers.chat_template import (
    BUILTIN_STOPS,
    BUILTIN_TEMPLATE,
    bos_id,
    chat_format,
    render_chat,
    turn_end_tokens,
    with_bos,
)


@dataclass
class SamplingParams:
    """How to generate one answer; its defaults are every command's (``gptlab sample``, ``chat``).
    ``check`` validates it where it comes in (a request, a command's flags)."""

    temperature: float = 0.7
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int = 256
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    #: run to max_new_tokens through EOS and the built-in template's turn ends (shown as text):
    #: a raw continuation, as ``gptlab sample`` writes, not a chat answer
    ignore_eos: bool = False

    def check(self) -> None:
        """Raise ``UserError`` naming every out-of-range setting."""
        check_sampling_args(self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty)
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens={self.max_new_tokens} must be at least 1")


@dataclass
class Completion:
    """One finished answer."""

    #: what is shown: the decoded output, cut before any stop string, without EOS
    text: str
    #: every id the model generated, EOS and the tokens of a stop string included (what it cost)
    token_ids: list[int]
    #: "stop" (EOS or a stop string) or "length" (max_new_tokens reached first)
    finish_reason: str


@dataclass
class ChatPrompt:
    ids: list[int]
    #: how many of the oldest turns were left out to fit the context window
    dropped_turns: int


QUANTIZE_CHOICES = ("int8",)


def prepare_for_decoding(model: torch.nn.Module, dtype: str | None = None, compile: bool = False,
                         quantize: str | None = None, calibration: torch.Tensor | None = None) -> torch.nn.Module:
    """``model`` (in eval mode, in place) ready to decode: its weights in ``dtype`` (``--dtype``:
    auto, fp32, bf16 or fp16, chosen by ``gptlab.device.pick_dtype`` on the model's device; None
    leaves them as they are), int8 weights (``quantize="int8"``, smoothed by the ``calibration``
    ids if given: ``quantize_int8``) and/or a compiled decode step (``compile``, see
    ``compile_decode``). What ``Engine`` does for --dtype, --quantize and --compile."""
    if quantize is not None and quantize not in QUANTIZE_CHOICES:
        raise UserError(f"quantize={quantize!r} is not supported; choose one of {', '.join(QUANTIZE_CHOICES)}")
    model.eval()
    if dtype is not None:
        # auto picks bf16 for decoding on CPUs with bf16 instructions, but int8 layers compute in
        # float32 around their int8 products: the rest of an int8 model stays fp32 then.
        device = next(model.parameters()).device
        cast_weights(model, pick_dtype(dtype, device, decoding=quantize is None).dtype)
    if quantize == "int8":
        quantize_int8(model, calibration)
    if compile:
        compile_decode(model)
    return model


def cast_weights(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Store the floating-point parameters in ``dtype``: half the memory, and half the bytes that
    every decoded token reads, in bf16 or fp16. Buffers such as the RoPE tables stay fp32, so
    positions far into a long context keep their precision; the layers cast them to the
    activations' dtype where they meet."""
    for p in model.parameters():
        if p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


class Engine:
    """A loaded model ready to continue prompts and conversations.

    ``dtype`` is the commands' --dtype (``prepare_for_decoding``): the CLI passes "auto", which
    takes bf16 on GPUs and CPUs that have it (without --quantize) and fp32 elsewhere; None (the
    default) keeps the weights as loaded, as a training job that samples from the model it
    trains needs. ``quantize="int8"`` computes every Linear layer, the head included, in int8 on
    the CPU (``quantize_int8``, smoothed by ``calibration_ids``; the model is changed in place): a
    quarter of the weight bytes read per token, and decoding 1.3-1.4x as fast as fp32 on an AVX2
    CPU, 2.3x on one with AVX-512 VNNI (benchmarks/RESULTS.md, "Decoding against llama.cpp").
    ``compile=True`` compiles the one-token decode step with torch.compile over a static KV
    cache: the same tokens (int8's may part at near-ties: ``compiled_decode``), decoding about
    1.2x faster on a 2-core CPU in fp32 and 2x with int8 (whose time goes mostly to the float
    work around its products, which compiling fuses: 2.7x fp32 on AVX2), but the first answer
    waits for the compile (one to three minutes, a few seconds once inductor's on-disk cache
    has it), and so does the first at a new batch size.
    Compiling is off by default for that reason (benchmarks/RESULTS.md).
    ``speculate=N`` drafts up to N tokens a step by prompt lookup (``gptlab.inference.speculative``)
    for greedy answers to one prompt at a time: the same tokens, fewer forward passes when the
    answer repeats its context; sampled answers and batches decode as usual.
    """

    def __init__(self, checkpoint, device: torch.device | str = "cpu", dtype: str | None = None,
                 compile: bool = False, quantize: str | None = None, speculate: int = 0):
        if speculate < 0:
            raise UserError(f"speculate={speculate}: give the most draft tokens per step, 1 or more (0: off)")
        calibration = checkpoint_calibration(checkpoint) if quantize else None
        self.model = prepare_for_decoding(checkpoint.model.to(device), dtype, compile, quantize, calibration)
        self.speculate = speculate
        self.speculation = SpeculationStats()  # what the drafts bought, over every answer so far
        self.tokenizer = checkpoint.tokenizer
        self.device = torch.device(device)
        self.block_size = checkpoint.config.block_size
        self.template, self.template_vars = chat_format(checkpoint)
        self.eos_ids = {self.tokenizer.special_tokens[n] for n in turn_end_tokens(checkpoint)}
        self.bos_id = bos_id(checkpoint)
        self.default_stops = BUILTIN_STOPS if self.template is BUILTIN_TEMPLATE else ()

    # --- prompts ------------------------------------------------------------------------------

    def encode_prompt(self, text: str) -> list[int]:
        """The ids of a raw prompt (no chat template), with the BOS in front where the model
        reads one (``bos_id``)."""
        return with_bos(self.tokenizer.encode(text), self.bos_id)

    def chat_prompt(self, messages: list[dict[str, str]], max_new_tokens: int) -> ChatPrompt:
        """Render the conversation for the model (with one BOS in front where it reads one: the
        template's own or ``bos_id``'s); drop the oldest turns (after any system
        message) until it leaves room for the answer in the context window. The room kept is
        ``max_new_tokens`` but at most a quarter of the window, so a small model's context is
        mostly the conversation; a longer answer still completes, as generation slides its
        window along past the end."""
        system = [m for m in messages[:1] if m["role"] == "system"]
        turns = messages[len(system):]
        budget = self.block_size - min(max_new_tokens, self.block_size // 4)
        rendered: dict[int, list[int]] = {}

        def fits(dropped: int) -> bool:
            text = render_chat(self.template, system + turns[dropped:], add_generation_prompt=True,
                               **self.template_vars)
            rendered[dropped] = with_bos(self.tokenizer.encode(text, allowed_special="all"), self.bos_id)
            return len(rendered[dropped]) <= budget

        if fits(0):
            return ChatPrompt(rendered[0], 0)
        most = len(turns) - 1  # the last message always stays
        if not fits(most):
            raise UserError(f"the last message alone needs more than {budget} tokens of the model's "
                            f"{self.block_size}; shorten it or lower the answer length")
        # Dropping turns only shortens the prompt, so the fewest drops that fit are found by
        # bisection: a few renders of a long conversation, not one per turn.
        lo, hi = 0, most  # lo does not fit, hi does
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if fits(mid) else (mid, hi)
        return ChatPrompt(rendered[hi], hi)

    # --- generation ---------------------------------------------------------------------------

    def seeded_generator(self, seed: int | None) -> torch.Generator:
        """A random number generator on the engine's device, seeded with ``seed`` (None: a fresh
        random seed); sampling draws only from it, so a seed reproduces an answer exactly."""
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed) if seed is not None else generator.seed()
        return generator

    def stream(self, prompt_ids: list[int], params: SamplingParams,
               generator: torch.Generator | None = None) -> Generator[str, None, Completion]:
        """Yield the continuation of ``prompt_ids`` as text pieces until EOS, a stop string or
        ``max_new_tokens``; return (as the generator's value) the ``Completion``. Draws come
        from ``generator`` if given (several answers from one seed that differ from each other),
        else from a new one seeded with ``params.seed``."""
        answer = self._answers([prompt_ids], params)[0]
        for _ in self._run([prompt_ids], [answer], params, generator):
            if piece := answer.take():
                yield piece
        return answer.completion()

    def generate_batch(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """Continue every prompt in one batch; each stops on its own EOS, stop string or
        ``max_new_tokens``, and the batch ends when all have.

        Greedy answers (temperature 0) are the ones each prompt gets alone. With sampling, the
        batch draws from one generator seeded by ``params.seed``: reproducible, but not the
        same draws as each prompt alone.
        """
        answers = self._answers(prompts, params)
        for _ in self._run(prompts, answers, params):
            pass
        return [a.completion() for a in answers]

    def _answers(self, prompts: list[list[int]], params: SamplingParams) -> list[_Answer]:
        params.check()
        if not prompts or not all(prompts):
            raise UserError("a prompt is empty; give each prompt at least one token")
        eos_ids, stops = (set(), ()) if params.ignore_eos else (self.eos_ids, self.default_stops)
        stops = tuple(params.stop) + stops
        return [_Answer(self.tokenizer, eos_ids, stops, params.max_new_tokens) for _ in prompts]

    def _run(self, prompts: list[list[int]], answers: list[_Answer], params: SamplingParams,
             generator: torch.Generator | None = None) -> Iterator[None]:
        """Generate for ``prompts`` (left-padded into one batch), feeding each step's tokens to
        ``answers``; yield after every step, stop once every answer is finished."""
        if generator is None:
            generator = self.seeded_generator(params.seed)
        width = max(len(p) for p in prompts)
        idx = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=self.device)  # (B, T)
        real = None  # all the same length: no padding, no mask
        if any(len(p) < width for p in prompts):
            real = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in prompts], device=self.device)
        with torch.no_grad():
            if self._speculates(params, len(prompts)):
                steps = generate_speculative(self.model, idx, params.max_new_tokens, self.speculate, self.speculation)
            else:
                steps = generate(self.model, idx, params.max_new_tokens, temperature=params.temperature,
                                 top_k=params.top_k, top_p=params.top_p, min_p=params.min_p, generator=generator,
                                 repetition_penalty=params.repetition_penalty, attention_mask=real)
            for step in steps:
                for answer, token in zip(answers, step.tolist()):
                    answer.add(token)
                yield
                if all(a.finish_reason for a in answers):
                    return


    def _speculates(self, params: SamplingParams, n_prompts: int) -> bool:
        """Whether this generation drafts: greedy, one prompt, no repetition penalty, a GPT."""
        return (self.speculate > 0 and n_prompts == 1 and params.temperature == 0
                and params.repetition_penalty in (None, 1.0) and hasattr(self.model, "new_kv_cache"))


class _Answer:
    """One sequence's output as its tokens arrive: the ids, the text safe to show, the text
    held back (an incomplete UTF-8 character, or what may be the start of a stop string), and,
    once finished, why."""

    def __init__(self, tokenizer, eos_ids: set[int], stops: tuple[str, ...], max_new_tokens: int):
        self.tokenizer, self.eos_ids, self.stops, self.max_new_tokens = tokenizer, eos_ids, stops, max_new_tokens
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.token_ids: list[int] = []
        self.shown = ""  # all text released so far
        self.fresh = ""  # released but not yet taken by a stream
        self.pending = ""  # decoded but held back
        self.finish_reason: str | None = None

    def add(self, token: int) -> None:
        """Take the next generated id (ignored once finished: the batch may run on)."""
        if self.finish_reason:
            return
        self.token_ids.append(token)
        if token in self.eos_ids:
            self._finish("stop", self.decoder.decode(b"", final=True))
            return
        self.pending += self.decoder.decode(self.tokenizer.decode_bytes([token]))
        hit = min((i for i in (self.pending.find(s) for s in self.stops) if i != -1), default=-1)
        if hit != -1:
            self.pending = self.pending[:hit]
            self._finish("stop")
        elif len(self.token_ids) == self.max_new_tokens:
            self._finish("length", self.decoder.decode(b"", final=True))
        else:
            self._release(len(self.pending) - _longest_stop_prefix(self.pending, self.stops))

    def _finish(self, reason: str, tail: str = "") -> None:
        # A stop string can only be completed by further text, and none comes: show the rest.
        self.pending += tail
        self._release(len(self.pending))
        self.finish_reason = reason

    def _release(self, n: int) -> None:
        self.shown += self.pending[:n]
        self.fresh += self.pending[:n]
        self.pending = self.pending[n:]

    def take(self) -> str:
        """The text released since the last call."""
        piece, self.fresh = self.fresh, ""
        return piece

    def completion(self) -> Completion:
        return Completion(self.shown, self.token_ids, self.finish_reason)


def _longest_stop_prefix(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
