"""The chat loop: :func:`run_repl` reads messages and slash commands and only talks to injected callbacks
(``read_line``, ``write``, a :class:`Conversation`), so tests drive it without a model.

Input to the loop (see :data:`HELP`): a line ending with ``\\`` continues on the next line; a line opening
with ``\"\"\"`` starts a block that ends at a line ending with ``\"\"\"``; ``//text`` sends ``/text``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol

from ...errors import did_you_mean

ReadLine = Callable[[str], str]  # prompt -> line without its newline; EOFError at end of input
Write = Callable[[str], None]  # writes exactly the text given (newlines included)


class Conversation(Protocol):
    """What :func:`run_repl` needs from a chat; :class:`~.chat.ChatSession` is the real one."""

    def reply(self, text: str) -> Iterable[str]: ...
    def reset(self) -> None: ...
    def set_system(self, text: str | None) -> None: ...
    def stats_text(self) -> str: ...


HELP = """\
commands:
  /help           this list
  /reset          forget the conversation (the system prompt stays)
  /system TEXT    set the system prompt (the conversation stays); /system alone removes it
  /stats          speed, time to first token, tokens and memory in the state
  /quit           leave (also /exit, Ctrl-D, or Ctrl-C at the prompt)
input:
  end a line with \\ to continue on the next line
  \"\"\" on its own line opens a block; a line ending with \"\"\" closes it
  //text sends /text; Ctrl-C while a reply streams stops that reply
"""
COMMANDS = ("/help", "/reset", "/system", "/stats", "/quit", "/exit")


def read_message(read_line: ReadLine, prompt: str = "> ", more: str = "... ") -> str:
    """One message, possibly over several lines (``\\`` continuation or a ``\"\"\"`` block).

    EOFError only when input ends before anything was typed; end of input inside a message sends what
    was read. KeyboardInterrupt passes through.
    """
    line = read_line(prompt)
    if line.lstrip().startswith('"""'):
        body = line.lstrip()[3:]
        if body.rstrip().endswith('"""'):  # """one line"""
            return body.rstrip()[:-3]
        lines = [body] if body else []
        while True:
            try:
                line = read_line(more)
            except EOFError:
                return "\n".join(lines)
            if line.rstrip().endswith('"""'):
                last = line.rstrip()[:-3]
                return "\n".join(lines + ([last] if last else []))
            lines.append(line)
    lines = []
    while line.endswith("\\"):
        lines.append(line[:-1])
        try:
            line = read_line(more)
        except EOFError:
            return "\n".join(lines)
    return "\n".join(lines + [line])


def run_repl(
    read_line: ReadLine,
    write: Write,
    session: Conversation,
    on_message: Callable[[str], None] | None = None,
    prompt: str = "> ",
) -> int:
    """Read messages and slash commands until ``/quit``, EOF or Ctrl-C at the prompt; returns the number of
    messages answered. ``on_message(text)`` answers one message (default: stream ``session.reply`` to
    ``write``); Ctrl-C inside it stops that reply and the loop goes on."""
    answer = on_message or (lambda text: _stream(write, session.reply(text)))
    answered = 0
    while True:
        try:
            text = read_message(read_line, prompt)
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return answered
        stripped = text.strip()
        if not stripped:
            continue
        if stripped.startswith("/") and not stripped.startswith("//"):
            if not _command(stripped, session, write):
                return answered
            continue
        if stripped.startswith("//"):
            text = stripped[1:]
        try:
            answer(text)
            answered += 1
        except KeyboardInterrupt:
            write("\n[reply stopped]\n")


def _stream(write: Write, pieces: Iterable[str]) -> None:
    for piece in pieces:
        write(piece)
    write("\n")


def _command(line: str, session: Conversation, write: Write) -> bool:
    """Run one slash command; False means leave the loop."""
    name, arg = (line.split(None, 1) + [""])[:2]
    arg = arg.strip()
    if name in ("/quit", "/exit"):
        return False
    if name == "/help":
        write(HELP)
    elif name == "/reset":
        session.reset()
        write("conversation cleared\n")
    elif name == "/system":
        session.set_system(arg or None)
        write(f"system prompt set: {arg}\n" if arg else "system prompt removed\n")
    elif name == "/stats":
        write(session.stats_text() + "\n")
    else:
        write(f"unknown command {name}; {did_you_mean(name, COMMANDS)}type /help for the list\n")
    return True


__all__ = ["COMMANDS", "HELP", "Conversation", "ReadLine", "Write", "read_message", "run_repl"]
