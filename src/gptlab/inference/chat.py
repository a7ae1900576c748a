"""``gptlab chat``: a multi-turn conversation in the terminal, streamed as it is generated."""

from __future__ import annotations

import sys
from typing import TextIO

from gptlab.errors import UserError
from gptlab.inference.engine import Engine, SamplingParams

DEFAULT_CHAT_MODEL = "smollm2-135m-instruct"
HELP = """commands:
  /reset          forget the conversation (the system prompt stays)
  /system TEXT    set the system prompt and start over
  /temp X         sampling temperature (0 = greedy)
  /help           this help
  /quit           leave (Ctrl-D too); Ctrl-C stops the current answer"""


class ChatSession:
    """The conversation state and the slash commands, separate from terminal input/output."""

    def __init__(self, engine: Engine, params: SamplingParams, system: str | None = None):
        self.engine, self.params, self.system = engine, params, system
        self.history: list[dict[str, str]] = []
        # One stream of random draws for the whole conversation: a seed reproduces the session,
        # and each answer draws on from where the last stopped. (Seeding every answer afresh
        # gave each turn the same draws, and a small model the same reply, turn after turn.)
        self.generator = engine.seeded_generator(params.seed)

    def messages(self) -> list[dict[str, str]]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.history

    def command(self, line: str, out: TextIO) -> bool:
        """Run a slash command; False means quit."""
        name, _, arg = line.partition(" ")
        if name == "/quit":
            return False
        if name == "/reset":
            self.history.clear()
            print("[conversation cleared]", file=out)
        elif name == "/system":
            self.system = arg.strip() or None
            self.history.clear()
            print(f"[system prompt {'set' if self.system else 'removed'}; conversation cleared]", file=out)
        elif name == "/temp":
            try:
                value = float(arg)
                if value < 0:
                    raise ValueError
            except ValueError:
                print(f"[/temp needs a number >= 0, got {arg.strip()!r}]", file=out)
            else:
                self.params.temperature = value
                print(f"[temperature {value:g}]", file=out)
        elif name == "/help":
            print(HELP, file=out)
        else:
            print(f"[unknown command {name}; /help lists them]", file=out)
        return True

    def answer(self, text: str, out: TextIO) -> str:
        """Stream the reply to ``text``; Ctrl-C ends the reply early and keeps what came."""
        self.history.append({"role": "user", "content": text})
        prompt = self.engine.chat_prompt(self.messages(), self.params.max_new_tokens)
        if prompt.dropped_turns:
            print(f"[the conversation is longer than the context window: the oldest {prompt.dropped_turns} "
                  f"message(s) are left out]", file=out)
            del self.history[:prompt.dropped_turns]
        pieces = []
        try:
            for piece in self.engine.stream(prompt.ids, self.params, self.generator):
                pieces.append(piece)
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            out.write(" [stopped]")
        out.write("\n")
        reply = "".join(pieces).strip()
        self.history.append({"role": "assistant", "content": reply})
        return reply


def run_chat(model: str | None = None, system: str | None = None, params: SamplingParams | None = None,
             device: str = "auto", stdin: TextIO = sys.stdin, out: TextIO = sys.stdout, compile: bool = False,
             quantize: str | None = None, dtype: str = "auto", speculate: int = 0) -> None:
    from gptlab.device import pick_device
    from gptlab.weights.load import load_checkpoint

    params = params or SamplingParams()
    params.check()
    dev = pick_device(device)
    name = model or DEFAULT_CHAT_MODEL
    print(f"loading {name} ...", file=sys.stderr)
    engine = Engine(load_checkpoint(name, device=dev), dev, dtype=dtype, compile=compile, quantize=quantize,
                    speculate=speculate)
    session = ChatSession(engine, params, system)
    interactive = stdin.isatty()
    print(f"chatting with {name}; /help for commands, /quit to leave", file=out)
    while True:
        try:
            if interactive:
                line = input("you> ")
            else:
                line = stdin.readline()
                if not line:
                    break
                line = line.rstrip("\n")
        except EOFError:
            break
        except KeyboardInterrupt:
            print("\n[Ctrl-C stops an answer; /quit leaves]", file=out)
            continue
        if not line.strip():
            continue
        if line.startswith("/"):
            if not session.command(line.strip(), out):
                break
            continue
        out.write("assistant> ")
        try:
            session.answer(line, out)
        except UserError as e:
            session.history.pop()  # the message that did not fit
            print(f"[{e}]", file=out)
