"""Curriculum records and the JSONL loader that reports every problem with file and line.

A data directory holds (names configurable with `DataFiles`):

    sft_data.jsonl              {"prompt", "completion"} | {"messages": [...]} |
                                {"instruction", "input", "output"}
    preference_data.jsonl       {"prompt", "chosen", "rejected"} (strings or message lists;
                                TRL's implicit-prompt layout: chosen/rejected as whole
                                conversations sharing the prompt messages)
    quiz_data.jsonl             {"question", "reference_answer"}
    critical_distinctions.jsonl {"prompt", "correct", "incorrect"}
    prompt_data.jsonl           {"prompt"} (TRL's prompt-only layout: prompts without answers,
                                for the refine methods that sample their own; optional)
    persona.json                {"name", "description", "system_prompt", "voice_markers"} (optional)

Every record may carry `unit`, `chapter` and `topic` strings (default "default").

The loader never lets a raw exception escape: any input gives records or a `DataError`
whose `.problems` lists every problem found (file, line, what is wrong), warnings included.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

from ..errors import MindprintError
from ..io import DuplicateKeyError, json_loads_strict

log = logging.getLogger(__name__)

Message = dict  # {"role": "system"|"user"|"assistant", "content": str}

ROLES = ("system", "user", "assistant")
CURRICULUM_KEYS = ("unit", "chapter", "topic")
DEFAULT_GROUP = "default"
# Keys that are never reported as unknown (common bookkeeping fields).
_META_KEYS = {"id", "meta", "metadata", "source", "tags", "notes", "note", "explanation"}


# --------------------------------------------------------------------------- records

def _freeze(v: Any) -> Any:
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
    if isinstance(v, (tuple, list)):
        return tuple(_freeze(x) for x in v)
    return v


def _record_hash(self) -> int:
    """Records hold message dicts; hash them by value so records work in sets and dict keys."""
    return hash((type(self).__name__,) + tuple(_freeze(getattr(self, f.name))
                                               for f in dataclasses.fields(self)))


@dataclass(frozen=True)
class SFTRecord:
    """A prompt (chat messages, ending before the answer) and the answer in the persona's voice."""
    prompt: tuple[dict, ...]
    completion: str
    unit: str = DEFAULT_GROUP
    chapter: str = DEFAULT_GROUP
    topic: str = DEFAULT_GROUP
    source: str = ""  # "file:line"

    __hash__ = _record_hash


@dataclass(frozen=True)
class PreferenceRecord:
    """A prompt with a preferred (in-voice) and a rejected (generic or wrong) answer."""
    prompt: tuple[dict, ...]
    chosen: str
    rejected: str
    unit: str = DEFAULT_GROUP
    chapter: str = DEFAULT_GROUP
    topic: str = DEFAULT_GROUP
    source: str = ""  # "file:line"

    __hash__ = _record_hash


@dataclass(frozen=True)
class QuizRecord:
    """A question and the reference answer a tuned model is scored against."""
    question: str
    reference_answer: str
    unit: str = DEFAULT_GROUP
    chapter: str = DEFAULT_GROUP
    topic: str = DEFAULT_GROUP
    source: str = ""  # "file:line"

    __hash__ = _record_hash


@dataclass(frozen=True)
class PromptRecord:
    """A prompt without an answer: what the refine methods that sample their own answers
    (PPO, GRPO, RLOO) practise on, beyond the prompts the person answered."""
    prompt: tuple[dict, ...]
    unit: str = DEFAULT_GROUP
    chapter: str = DEFAULT_GROUP
    topic: str = DEFAULT_GROUP
    source: str = ""  # "file:line"

    __hash__ = _record_hash


@dataclass(frozen=True)
class DistinctionRecord:
    """A prompt where the correct answer must be told apart from a plausible incorrect one."""
    prompt: tuple[dict, ...]
    correct: str
    incorrect: str
    unit: str = DEFAULT_GROUP
    chapter: str = DEFAULT_GROUP
    topic: str = DEFAULT_GROUP
    source: str = ""  # "file:line"

    __hash__ = _record_hash

    def as_preference(self) -> PreferenceRecord:
        return PreferenceRecord(self.prompt, self.correct, self.incorrect, self.unit, self.chapter,
                                self.topic, self.source)


@dataclass
class Persona:
    """Who the model should sound like. `voice_markers`: phrases typical of the voice."""
    name: str = "persona"
    description: str = ""
    system_prompt: str | None = None
    voice_markers: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Problem:
    """One problem in the data: `file`, 1-based `line` (None: the whole file), `message`."""
    file: str
    line: int | None
    message: str
    severity: Literal["error", "warning"] = "error"

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}" if self.line is not None else self.file

    def __str__(self) -> str:
        tag = "" if self.severity == "error" else "warning: "
        return f"{self.where}: {tag}{self.message}"


class DataError(MindprintError):
    """Invalid data. `.problems` lists every problem found (errors first, then warnings)."""

    MAX_IN_MESSAGE = 50

    def __init__(self, problems: list[Problem], what: str = "data"):
        self.problems = list(problems)
        errors = [p for p in self.problems if p.severity == "error"]
        n = len(errors)
        head = f"invalid {what}: {n} problem{'s' if n != 1 else ''}"
        lines = [str(p) for p in errors[: self.MAX_IN_MESSAGE]]
        if n > self.MAX_IN_MESSAGE:
            lines.append(f"... and {n - self.MAX_IN_MESSAGE} more")
        super().__init__(head + ("\n  " + "\n  ".join(lines) if lines else ""))

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]


@dataclass(frozen=True)
class DataFiles:
    """File names inside a data directory, and which kinds must be present."""
    sft: str = "sft_data.jsonl"
    preference: str = "preference_data.jsonl"
    quiz: str = "quiz_data.jsonl"
    distinctions: str = "critical_distinctions.jsonl"
    prompts: str = "prompt_data.jsonl"
    persona: str = "persona.json"
    required: tuple[str, ...] = ("sft", "preference", "quiz")

    KINDS = ("sft", "preference", "quiz", "distinctions", "prompts")


@dataclass
class Dataset:
    sft: list[SFTRecord] = field(default_factory=list)
    preference: list[PreferenceRecord] = field(default_factory=list)
    quiz: list[QuizRecord] = field(default_factory=list)
    distinctions: list[DistinctionRecord] = field(default_factory=list)
    prompts: list[PromptRecord] = field(default_factory=list)
    persona: Persona = field(default_factory=Persona)
    warnings: list[Problem] = field(default_factory=list)
    root: Path | None = None
    paths: list[Path] = field(default_factory=list)  # the files read (for data hashes)

    def all_preference_pairs(self) -> list[PreferenceRecord]:
        """Preference pairs plus critical distinctions as pairs (for the reward model)."""
        return list(self.preference) + [d.as_preference() for d in self.distinctions]

    def summary(self) -> dict[str, int]:
        return {"sft": len(self.sft), "preference": len(self.preference), "quiz": len(self.quiz),
                "distinctions": len(self.distinctions), "prompts": len(self.prompts)}


# --------------------------------------------------------------------------- validation

class _Invalid(Exception):
    """Internal: a record-level problem (message only; file and line added by the caller)."""


def _type_name(v: Any) -> str:
    if v is None:
        return "null"
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "integer",
            float: "number"}.get(type(v), type(v).__name__)


def _short(v: Any, n: int = 40) -> str:
    try:
        s = json.dumps(v, ensure_ascii=True)
    except (TypeError, ValueError, RecursionError):
        s = repr(type(v))
    return s if len(s) <= n else s[: n - 3] + "..."


def _check_text(value: Any, name: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"field '{name}' must be a string, got {_type_name(value)} {_short(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _Invalid(f"field '{name}' contains an invalid Unicode character "
                       f"(a lone surrogate escape such as \\ud800)") from None
    if not allow_empty and not value.strip():
        raise _Invalid(f"field '{name}' is empty")
    return value


def _content(value: Any, name: str) -> str:
    """Message content: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(value, list):
        parts = []
        for i, part in enumerate(value):
            if not (isinstance(part, dict) and part.get("type", "text") == "text" and "text" in part):
                raise _Invalid(f"{name}[{i}] must be a text part {{\"type\": \"text\", \"text\": ...}}, "
                               f"got {_short(part)}")
            parts.append(_check_text(part["text"], f"{name}[{i}].text", allow_empty=True))
        value = "".join(parts)
        if not value.strip():
            raise _Invalid(f"field '{name}' is empty")
        return value
    return _check_text(value, name)


def _messages(value: Any, name: str, warn: list[str]) -> tuple[dict, ...]:
    if not isinstance(value, list):
        raise _Invalid(f"field '{name}' must be a list of messages, got {_type_name(value)} "
                       f"{_short(value)}")
    if not value:
        raise _Invalid(f"field '{name}' is an empty list")
    out = []
    for i, m in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(m, dict):
            raise _Invalid(f"{where} must be an object with 'role' and 'content', got "
                           f"{_type_name(m)} {_short(m)}")
        if "role" not in m:
            raise _Invalid(f"{where} has no 'role'")
        role = m["role"]
        if not isinstance(role, str):
            raise _Invalid(f"{where}.role must be a string, got {_type_name(role)} {_short(role)}")
        if role not in ROLES:
            close = difflib.get_close_matches(role, ROLES, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise _Invalid(f"{where} has unknown role {_short(role)}{hint}; roles: {', '.join(ROLES)}")
        if "content" not in m:
            raise _Invalid(f"{where} has no 'content'")
        content = _content(m["content"], f"{where}.content")
        extra = sorted(str(k) for k in m if k not in ("role", "content", "name"))
        if extra:
            warn.append(f"{where} has unknown keys {', '.join(extra)} (ignored)")
        out.append({"role": role, "content": content})
    return tuple(out)


def _prompt(value: Any, name: str, warn: list[str]) -> tuple[dict, ...]:
    if isinstance(value, str):
        return ({"role": "user", "content": _check_text(value, name)},)
    if isinstance(value, list):
        msgs = _messages(value, name, warn)
        if msgs[-1]["role"] == "assistant":
            raise _Invalid(f"field '{name}' ends with an assistant message; the prompt must end "
                           f"before the answer")
        if not any(m["role"] == "user" for m in msgs):
            raise _Invalid(f"field '{name}' has no user message")
        return msgs
    raise _Invalid(f"field '{name}' must be a string or a list of messages, got "
                   f"{_type_name(value)} {_short(value)}")


def _answer(value: Any, name: str, warn: list[str]) -> str:
    """An answer: a string, or a list holding exactly one assistant message (TRL layout)."""
    if isinstance(value, str):
        return _check_text(value, name)
    if isinstance(value, list):
        msgs = _messages(value, name, warn)
        if len(msgs) != 1 or msgs[0]["role"] != "assistant":
            raise _Invalid(f"field '{name}' as a message list must hold exactly one assistant "
                           f"message (got roles: {', '.join(m['role'] for m in msgs)})")
        return msgs[0]["content"]
    raise _Invalid(f"field '{name}' must be a string or a list with one assistant message, got "
                   f"{_type_name(value)} {_short(value)}")


def _system(rec: dict, prompt: tuple[dict, ...]) -> tuple[dict, ...]:
    if "system" in rec:
        sys_text = _check_text(rec["system"], "system")
        if prompt and prompt[0]["role"] == "system":
            raise _Invalid("field 'system' given but the prompt already starts with a system message")
        return ({"role": "system", "content": sys_text},) + prompt
    return prompt


def _require(rec: dict, keys: Iterable[str], kind: str) -> None:
    missing = [k for k in keys if k not in rec]
    if missing:
        present = ", ".join(sorted(map(str, rec))) or "none"
        raise _Invalid(f"{kind} record is missing field{'s' if len(missing) > 1 else ''} "
                       f"{', '.join(repr(k) for k in missing)} (has: {present})")


def _parse_sft(rec: dict, warn: list[str]) -> tuple[dict, Any]:
    layouts = [k for k in ("messages", "prompt", "instruction") if k in rec]
    if len(layouts) > 1:
        raise _Invalid(f"SFT record mixes layouts ({', '.join(layouts)}); use one of "
                       f"prompt/completion, messages, instruction/input/output")
    if "messages" in rec:
        msgs = _messages(rec["messages"], "messages", warn)
        if msgs[-1]["role"] != "assistant":
            raise _Invalid(f"field 'messages' must end with an assistant message (the completion), "
                           f"ends with role '{msgs[-1]['role']}'")
        prompt = msgs[:-1]
        if not any(m["role"] == "user" for m in prompt):
            raise _Invalid("field 'messages' has no user message before the final assistant message")
        prompt = _system(rec, prompt)
        return {"prompt": prompt, "completion": msgs[-1]["content"]}, ("messages", "system")
    if "instruction" in rec:
        _require(rec, ("instruction", "output"), "SFT (instruction/input/output)")
        text = _check_text(rec["instruction"], "instruction")
        if "input" in rec and rec["input"] is not None:
            extra = _check_text(rec["input"], "input", allow_empty=True)
            if extra.strip():
                text = f"{text}\n\n{extra}"
        prompt = _system(rec, ({"role": "user", "content": text},))
        return ({"prompt": prompt, "completion": _check_text(rec["output"], "output")},
                ("instruction", "input", "output", "system"))
    if "text" in rec and "completion" not in rec:
        raise _Invalid("plain {\"text\"} records cannot be split into prompt and answer; use "
                       "prompt/completion or messages")
    _require(rec, ("prompt", "completion"), "SFT")
    prompt = _system(rec, _prompt(rec["prompt"], "prompt", warn))
    return ({"prompt": prompt, "completion": _answer(rec["completion"], "completion", warn)},
            ("prompt", "completion", "system"))


def _parse_preference(rec: dict, warn: list[str]) -> tuple[dict, Any]:
    _require(rec, ("chosen", "rejected"), "preference")
    known = ("prompt", "chosen", "rejected", "system")
    if "prompt" in rec:
        prompt = _system(rec, _prompt(rec["prompt"], "prompt", warn))
        chosen = _answer(rec["chosen"], "chosen", warn)
        rejected = _answer(rec["rejected"], "rejected", warn)
    else:
        # TRL's implicit prompt: chosen and rejected are whole conversations sharing the prompt.
        if not (isinstance(rec["chosen"], list) and isinstance(rec["rejected"], list)):
            raise _Invalid("preference record has no 'prompt'; give one, or give chosen and "
                           "rejected as full conversations (message lists) sharing the prompt")
        c = _messages(rec["chosen"], "chosen", warn)
        r = _messages(rec["rejected"], "rejected", warn)
        for name, msgs in (("chosen", c), ("rejected", r)):
            if msgs[-1]["role"] != "assistant":
                raise _Invalid(f"field '{name}' must end with an assistant message")
        if c[:-1] != r[:-1]:
            raise _Invalid("chosen and rejected conversations must share the same messages before "
                           "the final assistant answer (the implicit prompt)")
        prompt = c[:-1]
        if not any(m["role"] == "user" for m in prompt):
            raise _Invalid("the implicit prompt (messages before the final answer) has no user message")
        prompt = _system(rec, prompt)
        chosen, rejected = c[-1]["content"], r[-1]["content"]
    if chosen.strip() == rejected.strip():
        raise _Invalid("chosen and rejected are identical")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}, known


def _parse_quiz(rec: dict, warn: list[str]) -> tuple[dict, Any]:
    _require(rec, ("question", "reference_answer"), "quiz")
    return ({"question": _check_text(rec["question"], "question"),
             "reference_answer": _check_text(rec["reference_answer"], "reference_answer")},
            ("question", "reference_answer"))


def _parse_distinction(rec: dict, warn: list[str]) -> tuple[dict, Any]:
    _require(rec, ("prompt", "correct", "incorrect"), "critical-distinction")
    prompt = _system(rec, _prompt(rec["prompt"], "prompt", warn))
    correct = _answer(rec["correct"], "correct", warn)
    incorrect = _answer(rec["incorrect"], "incorrect", warn)
    if correct.strip() == incorrect.strip():
        raise _Invalid("correct and incorrect are identical")
    return ({"prompt": prompt, "correct": correct, "incorrect": incorrect},
            ("prompt", "correct", "incorrect", "system"))


def _parse_prompt(rec: dict, warn: list[str]) -> tuple[dict, Any]:
    _require(rec, ("prompt",), "prompt")
    for k in ("completion", "chosen", "rejected"):
        if k in rec:
            raise _Invalid(f"a prompt record holds no answer (field '{k}'); answered prompts "
                           "belong in the SFT or preference file")
    return {"prompt": _system(rec, _prompt(rec["prompt"], "prompt", warn))}, ("prompt", "system")


_KIND_NAMES = {"sft": "an SFT record", "preference": "a preference record",
               "quiz": "a quiz record", "distinctions": "a critical-distinction record",
               "prompts": "a prompt record"}

_PARSERS = {"sft": (_parse_sft, SFTRecord), "preference": (_parse_preference, PreferenceRecord),
            "quiz": (_parse_quiz, QuizRecord), "distinctions": (_parse_distinction, DistinctionRecord),
            "prompts": (_parse_prompt, PromptRecord)}


def _curriculum_fields(rec: dict) -> dict:
    from ..io import safe_name

    out = {}
    for k in CURRICULUM_KEYS:
        if k not in rec or rec[k] is None:
            out[k] = DEFAULT_GROUP
            continue
        v = _check_text(rec[k], k)
        v = v.strip()
        try:
            safe_name(v, k)
        except MindprintError:
            raise _Invalid(f"{k} {_short(v)} has no characters usable in a directory name "
                           f"(use letters, digits, '-', '_' or '.')") from None
        out[k] = v
    return out


def _dedupe_key(kind: str, fields: dict) -> str:
    return json.dumps([kind, fields], sort_keys=True, ensure_ascii=True)


def parse_record(kind: str, rec: Any, source: str = "") -> tuple[Any, list[str]]:
    """Validate one decoded JSON value as a record of `kind`; returns (record, warnings).

    Raises `DataError` with one problem (line from `source` "file:line") when invalid.
    """
    file, _, line = source.rpartition(":")
    lineno = int(line) if line.isdigit() else None
    file = file if lineno is not None else source
    try:
        return _parse(kind, rec, source)
    except _Invalid as e:
        raise DataError([Problem(file, lineno, str(e))]) from None


def _parse(kind: str, rec: Any, source: str) -> tuple[Any, list[str]]:
    if kind not in _PARSERS:
        raise ValueError(f"unknown record kind {kind!r}")
    if not isinstance(rec, dict):
        raise _Invalid(f"{_KIND_NAMES[kind]} must be a JSON object, got {_type_name(rec)} "
                       f"{_short(rec)}")
    warn: list[str] = []
    parse, cls = _PARSERS[kind]
    errors = []
    try:
        fields, known = parse(rec, warn)
    except _Invalid as e:
        errors.append(str(e))
    try:
        where = _curriculum_fields(rec)
    except _Invalid as e:
        errors.append(str(e))
    if errors:
        raise _Invalid("; ".join(errors))
    unknown = sorted(str(k) for k in rec if k not in known and k not in CURRICULUM_KEYS
                     and k not in _META_KEYS)
    for k in unknown:
        close = difflib.get_close_matches(k, list(known) + list(CURRICULUM_KEYS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        warn.append(f"unknown key '{k}' ignored{hint}")
    return cls(**fields, **where, source=source), warn


# --------------------------------------------------------------------------- files

def _read_lines(path: Path, display: str, problems: list[Problem]) -> list[tuple[int, str]] | None:
    """Decoded non-blank lines with 1-based numbers, or None when the file cannot be used."""
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        problems.append(Problem(display, None, "is a directory, expected a JSONL file"))
        return None
    except OSError as e:
        problems.append(Problem(display, None, f"cannot be read: {e.strerror or e}"))
        return None
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    out = []
    for i, raw in enumerate(data.split(b"\n"), start=1):
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            problems.append(Problem(display, i, f"not valid UTF-8: byte 0x{raw[e.start]:02x} at "
                                                f"column {e.start + 1}"))
            continue
        if text.strip():
            out.append((i, text))
    return out


def _load_jsonl(kind: str, path: Path, display: str, problems: list[Problem]) -> list:
    lines = _read_lines(path, display, problems)
    if lines is None:
        return []
    n_problems = len(problems)
    if not lines and len(problems) == n_problems:
        problems.append(Problem(display, None, f"is empty: no {kind} records"))
        return []
    records, seen = [], {}
    for lineno, text in lines:
        try:
            value = json_loads_strict(text)
        except DuplicateKeyError as e:
            problems.append(Problem(display, lineno, f"invalid JSON: duplicate key {e.key!r} "
                                                     "(json would silently keep the last one)"))
            continue
        except json.JSONDecodeError as e:
            hint = ""
            if text.strip() in ("[", "{") or text.rstrip().endswith((",", "[", "{")):
                hint = ("; a JSONL file holds one complete JSON object per line (not a JSON "
                        "array, not pretty-printed)")
            problems.append(Problem(display, lineno, f"invalid JSON: {e.msg} (column {e.colno}){hint}"))
            continue
        except RecursionError:
            problems.append(Problem(display, lineno, "invalid JSON: nested too deeply"))
            continue
        except ValueError as e:  # e.g. an integer literal too long to convert
            problems.append(Problem(display, lineno, f"invalid JSON: {e}"))
            continue
        try:
            rec, warns = _parse(kind, value, f"{display}:{lineno}")
        except _Invalid as e:
            problems.append(Problem(display, lineno, str(e)))
            continue
        except RecursionError:
            problems.append(Problem(display, lineno, "record is nested too deeply"))
            continue
        for w in warns:
            problems.append(Problem(display, lineno, w, "warning"))
        key = _dedupe_key(kind, {k: v for k, v in dataclasses.asdict(rec).items() if k != "source"})
        if key in seen:
            problems.append(Problem(display, lineno, f"duplicate of the record on line {seen[key]}",
                                    "warning"))
        else:
            seen[key] = lineno
        records.append(rec)
    return records


def load_records_file(kind: str, path: str | os.PathLike) -> list:
    """The records of one JSONL file of `kind` (sft, preference, quiz, distinctions,
    prompts), checked as load_data_dir checks them; raises DataError naming each bad line."""
    p = Path(path)
    problems: list[Problem] = []
    if not p.is_file():
        raise DataError([Problem(str(p), None, "not found")])
    records = _load_jsonl(kind, p, str(p), problems)
    if any(x.severity == "error" for x in problems):
        raise DataError(problems)
    for w in problems[:20]:
        log.warning("%s", w)
    return records


def load_persona(path: str | os.PathLike, display: str | None = None,
                 problems: list[Problem] | None = None) -> Persona:
    """Read persona.json; problems go to `problems` (or raise DataError when not given)."""
    path = Path(path)
    display = display or str(path)
    own = problems is None
    problems = [] if own else problems
    persona = _read_persona(path, display, problems)
    if own and any(p.severity == "error" for p in problems):
        raise DataError(problems, "persona")
    return persona


def _read_persona(path: Path, display: str, problems: list[Problem]) -> Persona:
    try:
        data = path.read_bytes()
    except OSError as e:
        problems.append(Problem(display, None, f"cannot be read: {e.strerror or e}"))
        return Persona()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        problems.append(Problem(display, line, f"not valid UTF-8: byte 0x{data[e.start]:02x}"))
        return Persona()
    if not text.strip():
        problems.append(Problem(display, None, "is empty; expected a JSON object with name, "
                                               "description, system_prompt, voice_markers"))
        return Persona()
    try:
        obj = json_loads_strict(text)
    except DuplicateKeyError as e:
        idx = text.find(f'"{e.key}"', text.find(f'"{e.key}"') + 1)
        problems.append(Problem(display, text.count("\n", 0, idx) + 1 if idx >= 0 else None,
                                f"invalid JSON: duplicate key {e.key!r}"))
        return Persona()
    except json.JSONDecodeError as e:
        problems.append(Problem(display, e.lineno, f"invalid JSON: {e.msg} (column {e.colno})"))
        return Persona()
    except (RecursionError, ValueError) as e:
        problems.append(Problem(display, None, f"invalid JSON: {type(e).__name__}"))
        return Persona()
    if not isinstance(obj, dict):
        problems.append(Problem(display, None, f"must be a JSON object, got {_type_name(obj)}"))
        return Persona()
    kw: dict[str, Any] = {}
    known = ("name", "description", "system_prompt", "voice_markers")

    def line_of(key: str) -> int | None:
        idx = text.find(f'"{key}"')
        return text.count("\n", 0, idx) + 1 if idx >= 0 else None

    for key in ("name", "description"):
        if key in obj:
            try:
                kw[key] = _check_text(obj[key], key, allow_empty=(key == "description"))
            except _Invalid as e:
                problems.append(Problem(display, line_of(key), str(e)))
    if obj.get("system_prompt") is not None:
        try:
            kw["system_prompt"] = _check_text(obj["system_prompt"], "system_prompt")
        except _Invalid as e:
            problems.append(Problem(display, line_of("system_prompt"), str(e)))
    if "voice_markers" in obj:
        vm = obj["voice_markers"]
        if not isinstance(vm, list):
            problems.append(Problem(display, line_of("voice_markers"),
                                    f"field 'voice_markers' must be a list of strings, got "
                                    f"{_type_name(vm)}"))
        else:
            markers = []
            for i, m in enumerate(vm):
                try:
                    markers.append(_check_text(m, f"voice_markers[{i}]").strip())
                except _Invalid as e:
                    problems.append(Problem(display, line_of("voice_markers"), str(e)))
            kw["voice_markers"] = list(dict.fromkeys(markers))
    else:
        problems.append(Problem(display, None, "no 'voice_markers': voice-marker density cannot "
                                               "be measured", "warning"))
    for k in sorted(str(k) for k in obj if k not in known):
        problems.append(Problem(display, line_of(k), f"unknown key '{k}' ignored", "warning"))
    return Persona(**kw)


def question_key(text: str) -> str:
    """A question's identity for leak checks: lower case, single spaces, no end punctuation."""
    return " ".join(text.lower().split()).rstrip(" ?!.:;")


def quiz_repeats(records: Iterable[Any], quiz: Iterable[QuizRecord]) -> list[tuple[Any, QuizRecord]]:
    """Training records (SFT, preference, distinction, prompt) whose last user turn repeats a quiz
    question, with the quiz record it repeats: the quiz must be held out, so these are
    dropped from training."""
    questions = {}
    for q in quiz:
        questions.setdefault(question_key(q.question), q)
    out = []
    for r in records:
        users = [m["content"] for m in r.prompt if m.get("role") == "user"]
        if users and question_key(users[-1]) in questions:
            out.append((r, questions[question_key(users[-1])]))
    return out


def _quiz_repeat_checks(ds: Dataset, problems: list[Problem]) -> None:
    for kind in ("sft", "preference", "distinctions", "prompts"):
        for r, q in quiz_repeats(getattr(ds, kind), ds.quiz):
            file, _, line = r.source.rpartition(":")
            problems.append(Problem(file or r.source, int(line) if line.isdigit() else None,
                                    f"prompt repeats the quiz question of {q.source}: the pipeline "
                                    "drops it from training so the quiz stays held out",
                                    severity="warning"))


def _topic_checks(ds: Dataset, display: dict[str, str], problems: list[Problem],
                  quiz_present: bool) -> None:
    def first_lines(records) -> dict[tuple, str]:
        out: dict[tuple, str] = {}
        for r in records:
            out.setdefault((r.unit, r.chapter, r.topic), r.source)
        return out

    sft, quiz = first_lines(ds.sft), first_lines(ds.quiz)
    pref, dist = first_lines(ds.preference), first_lines(ds.distinctions)
    prompts = first_lines(ds.prompts)

    def split(source: str) -> tuple[str, int | None]:
        f, _, ln = source.rpartition(":")
        return (f, int(ln)) if ln.isdigit() else (source, None)

    def name(k: tuple) -> str:
        return "/".join(k)

    if quiz_present:
        for k, src in sft.items():
            if k not in quiz:
                problems.append(Problem(*split(src), f"topic '{name(k)}' has SFT data but no quiz "
                                                     f"questions in {display['quiz']}"))
    for what, table in (("quiz questions", quiz), ("preference pairs", pref),
                        ("critical distinctions", dist), ("prompts", prompts)):
        for k, src in table.items():
            held = what in ("quiz questions", "prompts")   # used by their topic only
            if k in sft or (not held and k == (DEFAULT_GROUP,) * 3):
                continue  # untagged pairs are global (reward model), not a topic's
            if sft or held:
                problems.append(Problem(*split(src), f"topic '{name(k)}' has {what} but no SFT "
                                                     f"data", "warning"))


def load_data_dir(path: str | os.PathLike, files: DataFiles | None = None,
                  require: Iterable[str] | None = None) -> Dataset:
    """Load and validate a data directory; raises DataError listing every problem.

    `require`: kinds that must be present (default `files.required`); other files are
    optional. Warnings (unknown keys, duplicates...) are kept in `Dataset.warnings`.
    """
    files = files or DataFiles()
    required = tuple(files.required if require is None else require)
    root = Path(path)
    problems: list[Problem] = []
    if not root.exists():
        raise DataError([Problem(str(root), None, "data directory does not exist")])
    if not root.is_dir():
        raise DataError([Problem(str(root), None, "is not a directory; give the directory that "
                                                  "holds the JSONL files")])
    ds = Dataset(root=root)
    display = {k: str(root / getattr(files, k)) for k in DataFiles.KINDS}
    present = {}
    for kind in DataFiles.KINDS:
        p = root / getattr(files, kind)
        present[kind] = p.exists()
        if not p.exists():
            if kind in required:
                problems.append(Problem(display[kind], None, f"missing: a {kind} file is required "
                                                             f"({getattr(files, kind)})"))
            continue
        ds.paths.append(p)
        setattr(ds, kind, _load_jsonl(kind, p, display[kind], problems))
    if not any(present.values()):
        problems = [Problem(str(root), None,
                            "holds none of the data files: " +
                            ", ".join(getattr(files, k) for k in DataFiles.KINDS))]
        raise DataError(problems)
    ppath = root / files.persona
    if ppath.exists():
        ds.paths.append(ppath)
        ds.persona = _read_persona(ppath, str(ppath), problems)
    _topic_checks(ds, display, problems, quiz_present=present["quiz"] and bool(ds.quiz))
    _quiz_repeat_checks(ds, problems)
    order = {f: i for i, f in enumerate(dict.fromkeys(p.file for p in problems))}
    problems.sort(key=lambda p: (order[p.file], p.line or 0))
    errors = [p for p in problems if p.severity == "error"]
    warnings = [p for p in problems if p.severity == "warning"]
    if errors:
        raise DataError(errors + warnings)
    ds.warnings = warnings
    for w in warnings[:20]:
        log.warning("%s", w)
    return ds


def message_texts(messages: Iterable[dict]) -> list[str]:
    return [m["content"] for m in messages]


def curriculum_texts(data_dir: str | os.PathLike, files: DataFiles | None = None) -> list[str]:
    """Every piece of text of a data directory's answered records (prompts, answers) and
    persona, in file order; the prompt-only file is left out (no answer of the model is
    taught from it, and adding practice prompts should not change the demo model).

    Used to train the demo model's tokenizer. Raises DataError on invalid data.
    """
    ds = load_data_dir(data_dir, files, require=())
    out: list[str] = []
    p = ds.persona
    if p != Persona():
        out += [t for t in (p.name, p.description, p.system_prompt) if t]
        out += list(p.voice_markers)
    for r in ds.sft:
        out += message_texts(r.prompt) + [r.completion]
    for r in ds.preference:
        out += message_texts(r.prompt) + [r.chosen, r.rejected]
    for r in ds.quiz:
        out += [r.question, r.reference_answer]
    for r in ds.distinctions:
        out += message_texts(r.prompt) + [r.correct, r.incorrect]
    return out
