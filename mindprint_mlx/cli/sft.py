"""`mindprint sft`: LoRA SFT on a data directory's SFT records."""

from __future__ import annotations

from pathlib import Path

import click


def held_out(records: list, fraction: float, seed: int) -> tuple[list, list]:
    """Seeded (train, eval) split; no eval set when fraction is 0 or there are < 5 records."""
    from ..train.reward import split_pairs

    if fraction <= 0 or len(records) < 5:
        return list(records), []
    train_idx, eval_idx = split_pairs(len(records), fraction, seed)
    return [records[i] for i in train_idx], [records[i] for i in eval_idx]


@click.command("sft")
@click.option("--config", "-c", "config", type=click.Path(dir_okay=False), default=None,
              help="YAML file of SFTRun keys (model, data_dir, out_dir, eval_fraction) and SFTConfig keys (lora_rank, learning_rate, ...).")
@click.option("--resume", is_flag=True, help="Continue from out_dir/checkpoint exactly.")
@click.option("--quantize", type=click.Choice(["4", "8"]), default=None, help="Quantize the base on load (QLoRA).")
@click.argument("overrides", nargs=-1)
def sft(config, resume, quantize, overrides):
    """Train a LoRA adapter ("sft") on the completions of DATA_DIR's SFT records.

    OVERRIDES are key=value pairs applied over the config, e.g. `learning_rate=2e-4 epochs=1`.
    Writes OUT_DIR/adapter (mlx-lm adapter), OUT_DIR/checkpoint, OUT_DIR/metrics.jsonl.
    """
    from ..config import load_run_config, save_config, to_dict
    from ..data import load_data_dir
    from ..models import load
    from ..train.sft import SFTConfig, SFTRun, train_sft

    run, cfg = load_run_config(config, SFTRun, SFTConfig, list(overrides))
    ds = load_data_dir(run.data_dir, require=("sft",))
    train, held = held_out(list(ds.sft), run.eval_fraction, cfg.seed)
    out = Path(run.out_dir)
    save_config({**to_dict(run), **to_dict(cfg)}, out / "config.yaml")
    model, tok = load(run.model, quantize=int(quantize) if quantize else None)
    click.echo(f"sft: {len(train)} training and {len(held)} held-out records -> {out}", err=True)
    from ..stop import graceful_sigint

    with graceful_sigint():   # first Ctrl-C: checkpoint after this step and stop
        res = train_sft(model, tok, train, cfg, out, eval_records=held or None, resume=resume)
    click.echo(f"adapter: {res.adapter_dir}")
    click.echo(f"steps: {res.steps}  train loss: {res.train_loss:.4f}" +
               (f"  eval loss: {res.eval_loss_start:.4f} -> {res.eval_loss:.4f}"
                if res.eval_loss is not None and res.eval_loss_start is not None else ""))
