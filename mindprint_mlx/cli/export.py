"""`mindprint export peft|reward`: adapters to PEFT, reward models to SEQ_CLS adapters."""

from __future__ import annotations

from pathlib import Path

import click


def hub_options(f):
    f = click.option("--dry-run", is_flag=True,
                     help="With --push-to-hub: list the files and print the model card; no network.")(f)
    f = click.option("--private", is_flag=True, help="With --push-to-hub: create a private repo.")(f)
    f = click.option("--push-to-hub", "repo_id", default=None, metavar="REPO",
                     help="Upload the result to this hub repo (user/name). Token: `hf auth login` or HF_TOKEN.")(f)
    f = click.option("--report", type=click.Path(exists=True, dir_okay=False), default=None,
                     help="The run's report.md (or a JSON of scores) for the model card; "
                          "default: a report.md found above the adapter.")(f)
    return f


def check_hub_flags(repo_id, private, dry_run) -> None:
    if (private or dry_run) and not repo_id:
        raise click.UsageError("--private and --dry-run go with --push-to-hub REPO")
    if repo_id:
        from ..export.hub import check_repo_id
        check_repo_id(repo_id)


def card_builder(kind: str, meta: dict, adapter_dir, report, repo_id, details=None,
                 base_model=None):
    """A function of the export/fuse result that returns the README.md text. The exporters
    call it before their output directory is swapped into place, so a card that cannot be
    built (an unreadable report) leaves nothing half-written. The card states what was
    exported: the result's rank and alpha (after --rank), its base and notes."""
    from ..export.card import find_report, model_card

    report = report or find_report(adapter_dir)

    def build(res) -> str:
        m = dict(meta)
        extra = dict(details or {})
        if getattr(res, "rank", None) is not None:
            m["r"], m["lora_alpha"] = res.rank, res.lora_alpha
            extra.update(_svd_details(res))
        notes = list(getattr(res, "notes", []) or [])
        if getattr(res, "config_added", None):
            notes.append("config.json carries a top-level " + ", ".join(sorted(res.config_added))
                         + " (from rope_parameters) for plain mlx-lm")
        if notes:
            extra["notes"] = "; ".join(notes)
        return model_card(kind, m, base_model=getattr(res, "base_model", None) or base_model,
                          repo_id=repo_id, report=report, details=extra)
    return build


def push(out: Path, repo_id, private, dry_run) -> None:
    if repo_id:
        from ..export.hub import push_to_hub
        url = push_to_hub(out, repo_id, private=private, dry_run=dry_run, echo=click.echo)
        if url:
            click.echo(f"uploaded to {url}")


@click.group("export")
def export() -> None:
    """Export mindprint (mlx-lm) adapters to the Hugging Face stack."""


_out = click.option("--output", "-o", "out", required=True, type=click.Path(file_okay=False),
                    help="Output directory (replaced atomically).")
_base = click.option("--base-model", default=None,
                     help="base_model_name_or_path to write (default: the base it was trained on); "
                          "use the hub id when training used a local copy.")
_model = click.option("--model", "-m", default=None,
                      help="Local base model directory, to read the architecture and layer count "
                           "when the adapter's metadata lacks them.")
_rank = click.option("--rank", "-r", type=click.IntRange(1), default=None,
                     help="Compress to this rank by SVD of each module's update (error printed).")


def _svd_details(res) -> dict:
    if not res.svd_errors:
        return {}
    return {"SVD compression": f"rank {res.rank}, max relative error {res.max_svd_error:.3e}"}


def _report_and_push(res, out, repo_id, private, dry_run) -> None:
    """A PEFT export's SVD errors (when compressed) and notes, then the optional hub push."""
    if res.svd_errors:
        errs = list(res.svd_errors.values())
        click.echo(f"SVD to rank {res.rank}: relative error max {max(errs):.3e}, "
                   f"mean {sum(errs) / len(errs):.3e} over {len(errs)} modules")
        for path, e in sorted(res.svd_errors.items(), key=lambda kv: -kv[1])[:5]:
            click.echo(f"  {path}: {e:.3e}")
    for n in res.notes:
        click.echo(f"note: {n}")
    push(Path(out), repo_id, private, dry_run)


@export.command("peft")
@click.argument("adapter_dir", type=click.Path(exists=True, file_okay=False))
@_out
@_rank
@_base
@_model
@click.option("--no-value-head", is_flag=True, help="Leave out a value head saved beside the adapter.")
@hub_options
def peft(adapter_dir, out, rank, base_model, model, no_value_head, report, repo_id, private, dry_run):
    """ADAPTER_DIR (mlx-lm adapter) -> PEFT LoRA adapter (CAUSAL_LM) in OUT."""
    from ..export.peft import export_peft
    from ..models.adapters import adapter_metadata

    check_hub_flags(repo_id, private, dry_run)
    card = card_builder("peft", adapter_metadata(adapter_dir), adapter_dir, report, repo_id)
    res = export_peft(adapter_dir, out, rank=rank, base_model=base_model, model=model,
                      value_head=not no_value_head, card=card)
    click.echo(f"PEFT adapter: {out} (rank {res.rank}, lora_alpha {res.lora_alpha:g}, "
               f"{res.modules} modules, base {res.base_model})")
    _report_and_push(res, out, repo_id, private, dry_run)


@export.command("reward")
@click.argument("reward_dir", type=click.Path(exists=True, file_okay=False))  # adapter or reward_model/
@_out
@click.option("--head", default="reward", show_default=True, help="Which saved head is the score.")
@click.option("--drop-bias", is_flag=True,
              help="Export a head with a non-zero bias anyway (transformers' score layer has "
                   "none): scores shift by -bias, preferences are unchanged.")
@_rank
@_base
@_model
@hub_options
def reward(reward_dir, out, head, drop_bias, rank, base_model, model, report, repo_id, private,
           dry_run):
    """REWARD_DIR (adapter + head) -> PEFT SEQ_CLS adapter with the head as `score`."""
    from ..export.peft import export_reward, reward_adapter_dir
    from ..models.adapters import adapter_metadata

    check_hub_flags(repo_id, private, dry_run)
    adapter_dir = reward_adapter_dir(reward_dir)
    card = card_builder("reward", adapter_metadata(adapter_dir), adapter_dir, report, repo_id)
    res = export_reward(reward_dir, out, head=head, drop_bias=drop_bias, rank=rank,
                        base_model=base_model, model=model, card=card)
    click.echo(f"PEFT SEQ_CLS reward model: {out} (rank {res.rank}, lora_alpha "
               f"{res.lora_alpha:g}, {res.modules} modules, base {res.base_model})")
    _report_and_push(res, out, repo_id, private, dry_run)
