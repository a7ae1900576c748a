"""Chat templates: turning a list of messages into the exact text a chat model was trained on.

Every chat model ships a Jinja template (in ``tokenizer_config.json`` or the GGUF metadata)
that wraps each turn in its own markers, such as ``<|im_start|>user ... <|im_end|>``. gptlab
renders it the way ``transformers`` does (same Jinja options and helpers). The environment is
sandboxed and immutable, because a template comes from a downloaded file: it must not reach
Python internals or change the objects it is given.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from gptlab.errors import UserError


@lru_cache(maxsize=16)
def _compile(template: str):
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
               sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    # trim_blocks/lstrip_blocks as in transformers: templates are written for these settings.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
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

    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.exceptions.SecurityError as e:
        raise UserError(f"the chat template tried something the sandbox forbids ({e}); the template is unsafe") from None
    except jinja2.exceptions.TemplateError as e:
        raise UserError(f"the chat template failed to render: {e}") from None


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
