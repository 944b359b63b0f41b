"""Upload an exported directory to the Hugging Face hub.

The token is whatever huggingface-hub finds (`hf auth login` or HF_TOKEN); mindprint never
reads, prints or writes it. `dry_run` lists what would be uploaded and prints the model
card without touching the network.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

from ..errors import MindprintError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")


def check_repo_id(repo_id: str) -> str:
    if not _REPO_ID.match(repo_id or "") or ".." in repo_id:
        raise MindprintError(f"hub repo id must look like 'user/name', got {repo_id!r}")
    return repo_id


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def upload_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False, dry_run: bool = False,
                echo: Callable[[str], None] = print, commit_message: str | None = None) -> str | None:
    """Create `repo_id` (if needed) and upload `folder`; returns the repo URL (None on
    a dry run, which only lists the files and prints README.md)."""
    check_repo_id(repo_id)
    folder = Path(folder)
    files = upload_files(folder)
    if not files:
        raise MindprintError(f"{folder}: nothing to upload")
    if dry_run:
        echo(f"dry run: would create {'private' if private else 'public'} model repo "
             f"{repo_id} and upload {len(files)} files:")
        for f in files:
            echo(f"  {f.relative_to(folder)}  ({_human(f.stat().st_size)})")
        card = folder / "README.md"
        if card.is_file():
            echo("--- README.md (model card) ---")
            echo(card.read_text(encoding="utf-8"))
        return None
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise MindprintError("HF_HUB_OFFLINE is set: cannot upload (unset it, or use --dry-run)")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model",
                          commit_message=commit_message or "Upload from mindprint-mlx",
                          ignore_patterns=[".*"])
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        hint = " (log in with `hf auth login` or set HF_TOKEN)" if status in (401, 403) else ""
        raise MindprintError(f"hub upload to {repo_id} failed: HTTP {status}{hint}") from None
    except (OSError, ValueError) as e:
        raise MindprintError(f"hub upload to {repo_id} failed: {str(e).splitlines()[0]}") from None
    return str(url)
