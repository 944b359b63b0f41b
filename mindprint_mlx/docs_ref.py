"""The configuration reference, docs/config.md, generated from the config dataclasses.

    python -m mindprint_mlx.docs_ref            # rewrite docs/config.md
    python -m mindprint_mlx.docs_ref --check    # exit 1 when docs/config.md is stale

Each entry of SECTIONS is one table: key | type | default | help. A field's help is its
`field(metadata={"help": ...})`; a field without one falls back to the comment beside it in
the source (the trailing `# ...` and its continuation lines, or a comment block of two or
more lines right above it). A field whose type is a dataclass is expanded as dotted keys
(`eval.weights.preference`), unless that dataclass has a table of its own here, which the
row then links to. tests/test_docs.py fails when the file differs from `render()`.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import io
import sys
import textwrap
import tokenize
import types
import typing
from pathlib import Path

import yaml

from .errors import MindprintError

DOC_PATH = Path(__file__).resolve().parents[1] / "docs" / "config.md"
COMMAND = "python -m mindprint_mlx.docs_ref"

# (import path "module:Class", where the keys are written). One table per entry; a config
# class that is not listed appears only where a listed one nests it (e.g. QuizWeights as
# `eval.weights.*` of PipelineConfig).
SECTIONS: list[tuple[str, str]] = [
    ("mindprint_mlx.pipeline.config:PipelineConfig",
     "a pipeline config file: `mindprint pipeline run CONFIG`, `mindprint demo` (configs/pipeline.yaml, configs/demo.yaml)"),
    ("mindprint_mlx.train.sft:SFTConfig",
     "the `sft:` section of a pipeline config (every topic's defaults); the trainer keys of `mindprint sft --config FILE`"),
    ("mindprint_mlx.train.sft:SFTRun",
     "the run keys of `mindprint sft --config FILE` (the same file holds the SFTConfig keys)"),
    ("mindprint_mlx.train.reward:RewardConfig",
     "the `reward.train:` section of a pipeline config; the trainer keys of `mindprint reward train --config FILE`"),
    ("mindprint_mlx.train.reward:RewardRun",
     "the run keys of `mindprint reward train --config FILE` (the same file holds the RewardConfig keys)"),
    ("mindprint_mlx.ppo.trainer:PPOConfig",
     "the `ppo:` section of a pipeline config or of `mindprint ppo --config FILE`; `train_ppo(..., PPOConfig(...))`"),
    ("mindprint_mlx.data.adaptive:AdaptiveBounds",
     "the `adaptive:` section of a pipeline config; `mindprint data report --bounds FILE`"),
    ("mindprint_mlx.ppo.run:PPORun",
     "the run keys of `mindprint ppo --config FILE` (PPOConfig keys at the top level or under `ppo:`)"),
    ("mindprint_mlx.preference.dpo:DPOConfig",
     "the `dpo:` section of `mindprint dpo --config FILE` (configs/align_methods.yaml)"),
    ("mindprint_mlx.cli.dpo:DPORunConfig", "`mindprint dpo --config FILE`"),
    ("mindprint_mlx.preference.ditto:DITTOConfig",
     "the `ditto:` section of `mindprint ditto --config FILE`; every DPO setting applies"),
    ("mindprint_mlx.cli.ditto:DITTORunConfig", "`mindprint ditto --config FILE`"),
    ("mindprint_mlx.grpo.trainer:GRPOConfig",
     "the `grpo:` section of `mindprint grpo --config FILE` (GRPO and RLOO)"),
    ("mindprint_mlx.cli.grpo:GRPORunConfig", "`mindprint grpo --config FILE`"),
]


class StaleReference(MindprintError):
    pass


def _load(path: str) -> type:
    mod_name, _, cls_name = path.partition(":")
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as e:
        raise MindprintError(f"docs_ref: cannot import {mod_name} for {cls_name} ({e}); "
                             "update SECTIONS in mindprint_mlx/docs_ref.py") from None
    cls = getattr(mod, cls_name, None)
    if cls is None or not dataclasses.is_dataclass(cls):
        raise MindprintError(f"docs_ref: {mod_name} has no dataclass {cls_name}; "
                             "update SECTIONS in mindprint_mlx/docs_ref.py")
    return cls


def anchor(cls: type) -> str:
    return cls.__name__.lower()


# ------------------------------------------------------------------ help from source comments

def _own_comments(cls: type) -> dict[str, str]:
    """Field name -> the comment beside it in `cls`'s own source (not its bases')."""
    try:
        src = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    lines = src.splitlines()
    comments: dict[int, tuple[int, str]] = {}
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = (tok.start[1], tok.string.lstrip("#").strip())

    def alone(n: int) -> bool:          # a line holding nothing but a comment
        return n in comments and lines[n - 1].lstrip().startswith("#")

    out = {}
    for node in ast.parse(src).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        beside = [n for n in range(node.lineno, node.end_lineno + 1) if n in comments and not alone(n)]
        parts = []
        if beside:
            parts.append(comments[beside[-1]][1])
            n = node.end_lineno + 1
            while alone(n) and comments[n][0] > node.col_offset:   # continuation, indented further
                parts.append(comments[n][1])
                n += 1
        else:                           # a block above it; one line alone is a group heading
            n, block = node.lineno - 1, []
            while alone(n) and comments[n][0] == node.col_offset:
                block.insert(0, comments[n][1])
                n -= 1
            if len(block) >= 2:
                parts = block
        if parts:
            out[node.target.id] = " ".join(parts)
    return out


def _help(cls: type, f: dataclasses.Field) -> str:
    h = f.metadata.get("help") if f.metadata else None
    if h:
        return " ".join(str(h).split())
    for klass in cls.__mro__:            # the most derived class that comments the field
        if dataclasses.is_dataclass(klass) and f.name in klass.__dict__.get("__annotations__", {}):
            text = _own_comments(klass).get(f.name)
            if text:
                return text
    return ""


# ------------------------------------------------------------------ formatting

def _type(tp: typing.Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return " | ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type(a) for a in args)
    if tp is type(None):
        return "None"
    if tp is typing.Any:
        return "Any"
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _value(v: typing.Any) -> str:
    if dataclasses.is_dataclass(v):
        v = dataclasses.asdict(v)
    text = yaml.safe_dump(v, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return f"`{_value(f.default)}`"
    if f.default_factory is not dataclasses.MISSING:
        return f"`{_value(f.default_factory())}`"
    return "(required)"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _rows(cls: type, prefix: str, tables: set[type]) -> list[str]:
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError) as e:
        raise MindprintError(f"docs_ref: cannot resolve the field types of {cls.__qualname__} "
                             f"({e})") from None
    rows = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key, tp, help_ = prefix + f.name, hints[f.name], _help(cls, f)
        if dataclasses.is_dataclass(tp) and tp in tables:
            link = f"the keys of [{tp.__name__}](#{anchor(tp)})"
            rows.append(f"| `{key}` | `{tp.__name__}` | | {_cell(help_ + '; ' if help_ else '')}{link} |")
        elif dataclasses.is_dataclass(tp):
            rows.extend(_rows(tp, key + ".", tables))
        else:
            rows.append(f"| `{key}` | `{_cell(_type(tp))}` | {_cell(_default(f))} | {_cell(help_)} |")
    return rows


def _summary(cls: type) -> str:
    doc = inspect.getdoc(cls) or ""
    if not doc or doc.startswith(cls.__name__ + "("):    # the dataclass's generated signature
        return ""
    return " ".join(doc.split("\n\n")[0].split())


def render() -> str:
    """docs/config.md as it should be now."""
    classes = [(_load(path), where) for path, where in SECTIONS]
    tables = {cls for cls, _ in classes}
    out = ["# Configuration reference", "",
           f"Generated from the config dataclasses by `{COMMAND}`; do not edit by hand",
           "(`tests/test_docs.py` fails when this file is stale). A key's help is its field's",
           "`metadata[\"help\"]`, or the comment beside the field in the source.", "",
           "Every key goes in the YAML file, or on the command line as `key=value` (`-s key=value` for",
           "`mindprint pipeline run`); nested keys are dotted (`ppo.steps=50`). An unknown key is an",
           "error naming it and the closest known one, a key given twice in one mapping is an error",
           "naming the file and line, and NaN or inf is never a valid number."]
    renamed = getattr(importlib.import_module("mindprint_mlx.config"), "RENAMED_KEYS", {})
    if renamed:
        out += ["", "Renamed keys (an old name is an error that names the new one): "
                + ", ".join(f"`{old}` -> `{new}`" for old, new in renamed.items()) + "."]
    out += [""] + [f"- [{cls.__name__}](#{anchor(cls)}): {where}" for cls, where in classes]
    for cls, where in classes:
        summary = _summary(cls)
        out += ["", f"## {cls.__name__}", "",
                f"`{cls.__module__}.{cls.__qualname__}`. Used in {where}."
                + (f" {summary}" if summary else ""), "",
                "| key | type | default | help |", "|---|---|---|---|"]
        out += _rows(cls, "", tables)
    return "\n".join(out) + "\n"


def check(path: Path = DOC_PATH) -> None:
    """Raise StaleReference when `path` is not what `render()` gives."""
    if not path.is_file() or path.read_text(encoding="utf-8") != render():
        raise StaleReference(f"docs/config.md is stale: run {COMMAND} to regenerate")


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 when the file is stale")
    p.add_argument("--out", type=Path, default=DOC_PATH, help=f"default: {DOC_PATH}")
    args = p.parse_args(argv)
    try:
        if args.check:
            check(args.out)
            return 0
        from .io import atomic_write_text

        atomic_write_text(args.out, render())
    except MindprintError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
