"""`mindprint import peft`: a PEFT LoRA adapter (trained with PEFT/TRL) to an mlx-lm adapter."""

from __future__ import annotations

import click


@click.group("import")
def import_() -> None:
    """Import adapters from the Hugging Face stack."""


@import_.command("peft")
@click.argument("peft_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--output", "-o", "out", required=True, type=click.Path(file_okay=False),
              help="Output mlx-lm adapter directory (replaced atomically).")
@click.option("--model", "-m", default=None,
              help="Base model (directory or cached hub id); default: base_model_name_or_path.")
@click.option("--name", default=None, help="Adapter name stored in mindprint.json.")
def peft(peft_dir, out, model, name):
    """PEFT_DIR (adapter_config.json + adapter_model.safetensors) -> mlx-lm adapter in OUT."""
    from ..export.peft import import_peft
    from ..models.adapters import adapter_metadata

    import_peft(peft_dir, out, model=model, name=name)
    meta = adapter_metadata(out)
    heads = ", heads: " + ", ".join(meta["heads"]) if meta.get("heads") else ""
    click.echo(f"mlx-lm adapter: {out} (rank {meta['r']}, {len(meta['targets'])} targets in "
               f"{len(meta['layers'])} layers{heads})")
