"""Management interface (SPEC §5), sans-IO: a command per line, an answer of
result lines closed by an empty line."""

from typing import Iterable

COMMANDS = frozenset(["sessions", "summary", "version", "accounting", "find", "end", "drain", "undrain", "relay",
                      "quit", "exit"])


def parse_command(line: str) -> str:
    """The command word in lower case, then its argument as given (`find Alice`); '' for an empty
    line (ignored)."""
    word, _, argument = line.strip().partition(" ")
    argument = argument.strip()
    return word.lower() + " " + argument if argument else word.lower()


def encode_answer(lines: Iterable[str]) -> bytes:
    out = []
    for line in lines:
        if "\n" in line or "\r" in line:
            raise ValueError("an answer line cannot contain a line break")
        out.append(line + "\r\n")
    out.append("\r\n")
    return "".join(out).encode("utf-8")


ERROR = encode_answer(["error"])
