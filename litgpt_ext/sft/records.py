"""Reading and checking SFT records: every bad record is one ValueError naming the file, the record
(its line for .jsonl) and the field, with what would be valid.

A record is either an instruction record (`instruction`: a string, optional; `input`: a string or
null, optional; `output`: a string) or plain text (`text_field`, default `text`: a string).
Common hub field names (`prompt`, `completion`, `response`, `question`, `answer`, ...) are not
mapped silently: a record using them is refused with the field name we expect, since a silently
ignored `prompt` would train on responses without their prompts.
"""

from __future__ import annotations

import json
from pathlib import Path

PROMPT_ALIASES = ("prompt", "question", "query", "problem")
"""Field names that usually hold the prompt in hub exports: we expect `instruction`."""
RESPONSE_ALIASES = ("completion", "response", "answer", "target", "solution")
"""Field names that usually hold the response in hub exports: we expect `output`."""
EXPECTED = ("instruction records {instruction: string (optional), input: string or null (optional), "
            "output: string} or plain text {%s: string}")


def _decode(path: Path, raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")  # a UTF-8 byte-order mark is harmless: accept it
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ValueError(f"{path}: not UTF-8 text: byte 0x{raw[e.start]:02x} at byte offset {e.start} (line {line})"
                         f" ({e.reason}); SFT data files must be UTF-8 (re-encode it, e.g. "
                         f"`iconv -f latin1 -t utf-8`)") from e


def read_json_rows_with_lines(path: Path) -> tuple[list, list[int] | None]:
    """(rows, their line numbers) of a .jsonl file (one JSON value a line), or (rows, None) of a .json
    file (a list). Bad JSON and non-UTF-8 bytes name the file (and line / byte offset)."""
    path = Path(path)
    if path.suffix not in (".json", ".jsonl"):
        raise ValueError(f"SFT data file {str(path)!r}: expected .json (a list) or .jsonl")
    raw = _decode(path, path.read_bytes())
    if path.suffix == ".jsonl":
        rows, lines = [], []
        for i, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i}: not valid JSON: {e}") from e
                lines.append(i)
        return rows, lines
    try:
        rows = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(rows).__name__}")
    return rows, None


def read_json_rows(path: Path) -> list:
    """The rows of a .jsonl file (one JSON value a line) or a .json file (a list)."""
    return read_json_rows_with_lines(path)[0]


def _type_name(v) -> str:
    return "null" if v is None else {"str": "string", "bool": "boolean", "int": "number", "float": "number",
                                     "list": "list", "dict": "object"}.get(type(v).__name__, type(v).__name__)


def _shown(v) -> str:
    s = json.dumps(v, ensure_ascii=False)
    return s if len(s) <= 40 else s[:37] + "..."


def record_problem(row, text_field: str = "text") -> str | None:
    """What is wrong with one record (None: it is valid)."""
    if not isinstance(row, dict):
        return f"is a JSON {_type_name(row)} ({_shown(row)}), not an object; expected " + EXPECTED % text_field
    keys = sorted(row)
    if "output" in row:
        bad = [(f, "a string") for f in ("output",) if not isinstance(row[f], str)]
        if "instruction" in row and not isinstance(row["instruction"], str):
            bad.append(("instruction", "a string (or leave the field out)"))
        if row.get("input") is not None and not isinstance(row["input"], str):
            bad.append(("input", "a string or null"))
        if bad:
            f, want = bad[0]
            return (f"field {f!r} is a {_type_name(row[f])} ({_shown(row[f])}); expected {want}"
                    + (" (quote numbers as JSON strings)" if isinstance(row[f], (int, float)) and f == "output" else ""))
        if "instruction" not in row:
            alias = next((a for a in PROMPT_ALIASES if a in row), None)
            if alias is not None:  # the prompt would be dropped silently: training on responses alone
                return (f"has {alias!r} but no 'instruction': the prompt field must be named 'instruction' "
                        f"(rename {alias!r} to 'instruction'); it has {keys}")
        return None
    if text_field in row:
        if not isinstance(row[text_field], str):
            return (f"field {text_field!r} is a {_type_name(row[text_field])} ({_shown(row[text_field])}); "
                    "expected a string")
        return None
    prompt = next((a for a in ("instruction",) + PROMPT_ALIASES if a in row), None)
    response = next((a for a in RESPONSE_ALIASES if a in row), None)
    if response is not None:
        return (f"has {response!r} but no 'output': rename {response!r} to 'output'"
                + (f" and {prompt!r} to 'instruction'" if prompt not in (None, "instruction") else "")
                + f" (litgpt's instruction format); it has {keys}")
    return (f"has neither 'output' (instruction format: instruction, input, output) nor {text_field!r} "
            f"(plain text); it has {keys}")


def load_records(path: str | Path, text_field: str = "text") -> list[dict]:
    """Rows of a .json (a list) or .jsonl file; each must be a valid instruction or plain-text record."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SFT data file {str(path)!r} does not exist")
    rows, lines = read_json_rows_with_lines(path)
    for i, row in enumerate(rows):
        problem = record_problem(row, text_field)
        if problem is not None:
            where = f"{path}:{lines[i]}: record {i} (line {lines[i]})" if lines else f"{path}: record {i}"
            raise ValueError(f"{where}: {problem}")
    if not rows:
        raise ValueError(f"SFT data file {str(path)!r} holds no records")
    return rows
