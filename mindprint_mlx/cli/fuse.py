"""`mindprint fuse`: base + adapter -> a full Hugging Face checkpoint."""

from __future__ import annotations

import click

from pathlib import Path

from .export import card_builder, check_hub_flags, hub_options, push


@click.command("fuse")
@click.option("--model", "-m", required=True, help="Base model: local directory or hub id.")
@click.option("--adapter", "-a", "adapter", required=True, type=click.Path(exists=True, file_okay=False),
              help="Adapter directory (mlx-lm format).")
@click.option("--output", "-o", "out", required=True, type=click.Path(file_okay=False),
              help="Output checkpoint directory (replaced atomically).")
@click.option("--dequantize", is_flag=True,
              help="For an MLX-quantized base: write full-precision weights (required for transformers).")
@hub_options
def fuse(model, adapter, out, dequantize, report, repo_id, private, dry_run):
    """Fold ADAPTER into MODEL and write config, safetensors and tokenizer files to OUT."""
    from ..export.fuse import fuse as fuse_model
    from ..models.adapters import adapter_metadata

    check_hub_flags(repo_id, private, dry_run)
    # the card is built inside fuse, before the checkpoint is swapped into place
    card = card_builder("fused", adapter_metadata(adapter), adapter, report, repo_id,
                        base_model=model)
    res = fuse_model(model, adapter, out, dequantize=dequantize, card=card)
    click.echo(f"fused checkpoint: {out} ({len(res.fused_weights)} weights updated"
               f"{', dequantized' if res.dequantized else ''})")
    if res.config_added:
        click.echo(f"note: config.json gets top-level {res.config_added} from rope_parameters, "
                   "so plain mlx_lm.load reads the same rope settings as transformers")
    push(Path(out), repo_id, private, dry_run)
