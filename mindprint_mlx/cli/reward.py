"""`mindprint reward train|score`: the Bradley-Terry reward model."""

from __future__ import annotations

from pathlib import Path

import click


@click.group("reward")
def reward() -> None:
    """Train a reward model (LoRA + scalar head) on preference pairs, or score a response."""


@reward.command("train")
@click.option("--config", "-c", "config", type=click.Path(dir_okay=False), default=None,
              help="YAML file of RewardRun keys (model, data_dir, out_dir) and RewardConfig keys (learning_rate, patience, ...).")
@click.option("--resume", is_flag=True, help="Continue from out_dir/checkpoint.")
@click.option("--quantize", type=click.Choice(["4", "8"]), default=None, help="Quantize the base on load.")
@click.argument("overrides", nargs=-1)
def train(config, resume, quantize, overrides):
    """Train on DATA_DIR's preference pairs (plus critical distinctions when
    include_distinctions=true). OVERRIDES are key=value pairs, e.g. `learning_rate=5e-5 patience=2`.
    The best epoch's adapter and head go to OUT_DIR/adapter."""
    from ..config import load_run_config, save_config, to_dict
    from ..data import load_data_dir
    from ..models import load
    from ..train.reward import RewardConfig, RewardRun, train_reward_model

    run, cfg = load_run_config(config, RewardRun, RewardConfig, list(overrides))
    ds = load_data_dir(run.data_dir, require=("preference",))
    pairs = list(ds.preference) + (list(ds.distinctions) if cfg.include_distinctions else [])
    out = Path(run.out_dir)
    save_config({**to_dict(run), **to_dict(cfg)}, out / "config.yaml")
    model, tok = load(run.model, quantize=int(quantize) if quantize else None)
    click.echo(f"reward: {len(pairs)} preference pairs -> {out}", err=True)
    from ..stop import graceful_sigint

    with graceful_sigint():   # first Ctrl-C: checkpoint after this step and stop
        res = train_reward_model(model, tok, pairs, cfg, out, resume=resume)
    click.echo(f"adapter: {res.adapter_dir}")
    click.echo(f"epochs: {res.epochs}  best val loss: {res.best_val_loss:.4f}  "
               f"best val accuracy: {res.best_val_accuracy:.3f}  stopped early: {res.stopped_early}")


@reward.command("score")
@click.option("--model", "-m", required=True, help="Base model: local directory or hub id.")
@click.option("--reward", "-r", "reward_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Reward model directory (its adapter/ or the training out_dir).")
@click.option("--prompt", "-p", required=True, help="The user message.")
@click.option("--response", "responses", required=True, multiple=True, help="A response (repeatable).")
@click.option("--system", default=None, help="Optional system message before the prompt.")
@click.option("--quantize", type=click.Choice(["4", "8"]), default=None, help="Quantize the base on load.")
def score(model, reward_dir, prompt, responses, system, quantize):
    """Print the reward of each RESPONSE to PROMPT (chat template exactly as in training)."""
    from ..models import load
    from ..train.reward import RewardModel

    mdl, tok = load(model, quantize=int(quantize) if quantize else None)
    rm = RewardModel.load(mdl, tok, reward_dir)
    messages = ([{"role": "system", "content": system}] if system else []) + \
        [{"role": "user", "content": prompt}]
    scores = rm.score_batch([messages] * len(responses), list(responses))
    for r, s in zip(responses, scores):
        click.echo(f"{s:+.4f}\t{r}")
