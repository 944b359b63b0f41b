"""`mindprint generate`: a quick inference check, base and adapted side by side."""

from __future__ import annotations

import click


@click.command()
@click.option("--model", "-m", required=True,
              help="Base model: local directory, hub id, or demo (the demo's cached model).")
@click.option("--adapter", "-a", "adapters", multiple=True, type=click.Path(exists=True, file_okay=False),
              help="Adapter directory (mlx-lm format); repeat to stack adapters.")
@click.option("--prompt", "-p", required=True, help="The user message.")
@click.option("--system", default=None, help="Optional system message.")
@click.option("--compare", is_flag=True, help="Also answer with the base model; print both side by side.")
@click.option("--max-tokens", default=128, show_default=True, type=click.IntRange(1),
              help="Most tokens to generate.")
@click.option("--temp", default=0.7, show_default=True, type=click.FloatRange(0.0),
              help="Sampling temperature; 0 is greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0.0, 1.0),
              help="Nucleus sampling; 1.0 turns it off.")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Random seed (base and adapted answers use the same one).")
@click.option("--quantize", type=click.Choice(["4", "8"]), default=None, help="Quantize the base on load.")
def generate(model, adapters, prompt, system, compare, max_tokens, temp, top_p, seed, quantize):
    """Answer a prompt with the base model plus adapters (chat template, streamed tokens)."""
    from ..generate import generate_text, side_by_side
    from ..models import load
    from ..models import lora
    from ..models.adapters import load_adapter

    mdl, tok = load(model, quantize=int(quantize) if quantize else None)
    names = [load_adapter(mdl, a, name=f"adapter{i}") for i, a in enumerate(adapters)]
    kw = dict(max_tokens=max_tokens, temp=temp, top_p=top_p, seed=seed, system=system)

    def stream(title, active):
        click.secho(f"--- {title} ---", bold=True)
        with lora.active_adapters(mdl, active):
            text = generate_text(mdl, tok, prompt, on_text=lambda t: click.echo(t, nl=False), **kw)
        click.echo()
        return text

    if compare:
        base = stream("base", [])
        tuned = stream("adapted: " + ", ".join(adapters) if adapters else "adapted (no adapter given)", names)
        click.echo()
        click.echo(side_by_side(base, tuned))
    else:
        stream("adapted" if adapters else "base", names)
