"""Chat templates: turning a list of messages into the exact text a chat model was trained on.

Every chat model ships a Jinja template (in ``tokenizer_config.json`` or the GGUF metadata)
that wraps each turn in its own markers, such as ``<|im_start|>user ... <|im_end|>``. gptlab
renders it the way ``transformers`` does (same Jinja options and helpers). The environment is
sandboxed and immutable, because a template comes from a downloaded file: it must not reach
Python internals or change the objects it is given.

Jinja's stock sandbox hides an unsafe attribute behind an undefined value that fails only when
used (``{{ lipsum.__globals__ }}`` prints nothing); here it is an error at once. The sandbox
also does not bound memory, so every value a template builds (by ``*``, ``+``, ``~``, ``%``,
``**``, a filter or a method call) and its output are capped at ``MAX_CHARS`` characters,
items or bits: a template cannot build a terabyte string. (``range`` is capped by Jinja at
100,000 items. Nested loops can still spend CPU time without building anything.)
"""

from __future__ import annotations

import functools
import json
import re
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from gptlab.errors import UserError

#: the most characters (or list items, or bits of an integer) a template may build or output;
#: a prompt of a million-token context is a few million characters
MAX_CHARS = 1 << 24


def _checked(value: Any) -> Any:
    """``value``, unless it is larger than a template may build."""
    from jinja2.exceptions import SecurityError

    if isinstance(value, (str, list, tuple, dict)) and len(value) > MAX_CHARS:
        raise SecurityError(f"a value of {len(value):,} characters or items is larger than the {MAX_CHARS:,} a "
                            "chat template may build")
    if isinstance(value, int) and value.bit_length() > MAX_CHARS:
        raise SecurityError(f"an integer of {value.bit_length():,} bits is larger than a chat template may build")
    return value


def _check_arguments(args: Any, fmt: Any = None) -> None:
    """Refuse sizes (``center(10**12)``, ``'%0999999999d'``) before they are allocated."""
    from jinja2.exceptions import SecurityError

    numbers = [a for a in args if isinstance(a, int)]
    if isinstance(fmt, str):
        numbers += [int(n) for n in re.findall(r"\d+", fmt) if len(n) < 20]
    if any(abs(n) > MAX_CHARS for n in numbers):
        raise SecurityError(f"a size of more than {MAX_CHARS:,} is larger than a chat template may build")


@lru_cache(maxsize=None)
def _bounded_environment():
    """The sandbox class (built on first use, so importing this module does not import Jinja)
    and the wrapper that bounds a filter."""
    import jinja2
    from jinja2.compiler import CodeGenerator
    from jinja2.exceptions import SecurityError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class CheckedConcat(CodeGenerator):
        """Compiles ``a ~ b`` to ``environment.concat(...)``, checked like every other operator."""

        def visit_Concat(self, node, frame) -> None:
            self.write("environment.concat((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        code_generator_class = CheckedConcat
        intercepted_binops = frozenset({"*", "+", "**", "%"})

        def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
            raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

        def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
            sized, count = (left, right) if isinstance(right, int) else (right, left)
            if operator == "*" and isinstance(sized, (str, list, tuple)) and isinstance(count, int):
                _check_arguments([len(sized) * count])
            elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
                _check_arguments([abs(left).bit_length() * right])
            elif operator == "%":
                _check_arguments([], left)
            return _checked(super().call_binop(context, operator, left, right))

        def call(__self, __context, __obj, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 - Jinja's signature
            # The sandbox hands str.format over wrapped; the format string is the method's __self__.
            method = getattr(__obj, "__wrapped__", __obj)
            is_format = getattr(method, "__name__", "") in ("format", "format_map")
            fmt = getattr(method, "__self__", None) if is_format else None
            _check_arguments([*args, *kwargs.values()], fmt)
            return _checked(super().call(__context, __obj, *args, **kwargs))

        def concat(self, values: tuple) -> str:
            return _checked("".join(map(str, values)))

    def bounded_filter(f):
        @functools.wraps(f)  # keeps Jinja's pass_context/pass_environment marks
        def run(*args: Any, **kwargs: Any) -> Any:
            _check_arguments([*args, *kwargs.values()])
            return _checked(f(*args, **kwargs))
        return run

    return BoundedSandbox, bounded_filter


@lru_cache(maxsize=16)
def _compile(template: str):
    import jinja2
    from jinja2.ext import loopcontrols

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
               sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    # trim_blocks/lstrip_blocks as in transformers: templates are written for these settings.
    sandbox, bounded_filter = _bounded_environment()
    env = sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.filters = {name: bounded_filter(f) for name, f in env.filters.items()}
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise UserError(f"the chat template is not valid Jinja (line {e.lineno}: {e.message})") from None


def render_chat(template: str, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
                **variables: Any) -> str:
    """Render ``messages`` ([{"role": ..., "content": ...}, ...]) with a Jinja chat template.

    ``add_generation_prompt`` appends the opening of an assistant turn, so the model's next
    tokens are its answer. ``variables`` are passed through (``bos_token``, ``eos_token`` ...).
    """
    import jinja2

    pieces, size = [], 0
    try:
        for piece in _compile(template).generate(messages=messages, add_generation_prompt=add_generation_prompt,
                                                 **variables):
            size += len(piece)
            if size > MAX_CHARS:
                raise jinja2.exceptions.SecurityError(f"the output is longer than {MAX_CHARS:,} characters")
            pieces.append(piece)
    except jinja2.exceptions.SecurityError as e:
        raise UserError(f"the chat template tried something the sandbox forbids ({e}); the template is unsafe") from None
    except (jinja2.exceptions.TemplateError, OverflowError, RecursionError) as e:  # range(10**9), 10.0**999, ...
        raise UserError(f"the chat template failed to render: {str(e).splitlines()[0][:200]}") from None
    return "".join(pieces)


def chat_config(source: str | Path | dict[str, Any]) -> dict[str, Any]:
    """The chat settings (``chat_template``, ``bos_token``, ``eos_token``, ...) of a checkpoint
    directory (its ``tokenizer_config.json``) or of an already-read config dict."""
    if isinstance(source, dict):
        d = source
    else:
        f = Path(source) / "tokenizer_config.json"
        if not f.is_file():
            return {}
        try:
            d = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{f} is not valid JSON ({e})") from None
    # transformers stores special tokens either as strings or as {"content": ...} objects.
    out = {}
    for key, value in d.items():
        out[key] = value["content"] if isinstance(value, dict) and "content" in value else value
    return out


def checkpoint_chat_config(checkpoint: Any) -> dict[str, Any]:
    """The chat settings of a loaded checkpoint: those read from its GGUF metadata, else its
    directory's ``tokenizer_config.json``, else none (a from-scratch model)."""
    return chat_config(getattr(checkpoint, "tokenizer_config", None) or Path(checkpoint.path))


#: for models without a template of their own (gptlab's from-scratch checkpoints): plain text
#: turns, so a model trained on dialogue-shaped text can follow it
BUILTIN_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
BUILTIN_STOPS = ("\nUser:", "\nSystem:")
#: special tokens that end a turn in common chat formats, used when present in the vocabulary
TURN_END_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "</s>", "<end_of_turn>")


def turn_end_tokens(checkpoint) -> list[str]:
    """The special tokens on which a loaded checkpoint's turn ends: its chat settings' eos_token
    first, then those of ``TURN_END_TOKENS`` its vocabulary has. Generation stops on them and
    exports list them (``generation_config.json``'s eos_token_id), so both agree."""
    eos = checkpoint_chat_config(checkpoint).get("eos_token")
    specials = checkpoint.tokenizer.special_tokens
    return [name for name in dict.fromkeys((eos, *TURN_END_TOKENS)) if name in specials]


def bos_id(checkpoint) -> int | None:
    """The id put in front of every text the model reads (a ``gptlab sample`` prompt, a chat,
    every window and record of ``gptlab eval``), or None: the chat settings' bos_token where they
    say add_bos_token (Gemma, Llama 2). Such models were trained with it at position 0 and read
    text without it badly; transformers and llama.cpp put it there too."""
    return bos_of(checkpoint_chat_config(checkpoint), checkpoint.tokenizer)


def bos_of(config: dict[str, Any], tokenizer) -> int | None:
    """``bos_id`` from chat settings (``chat_config``) and the tokenizer they go with."""
    return tokenizer.special_tokens.get(config.get("bos_token")) if config.get("add_bos_token") else None


def with_bos(ids: list[int], bos: int | None) -> list[int]:
    """``ids`` with ``bos`` (``bos_id``) in front, unless it is None or already there, as when a
    chat template writes the bos_token itself: one BOS, never two."""
    return ids if bos is None or ids[:1] == [bos] else [bos, *ids]


def chat_format(checkpoint) -> tuple[str, dict[str, str]]:
    """The chat template a loaded checkpoint is talked to with (its own, or the built-in one for
    from-scratch models) and the variables the template uses. Chat and fine-tuning both use it,
    so a model is fine-tuned on exactly the text it is later prompted with."""
    config = checkpoint_chat_config(checkpoint)
    return config.get("chat_template") or BUILTIN_TEMPLATE, {k: config.get(k) or "" for k in ("bos_token", "eos_token")}
