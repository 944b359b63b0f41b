"""`mindprint ppo`: PPO on a prompts file with an SFT adapter and a reward model, one base in memory."""

from __future__ import annotations

import click


@click.command("ppo")
@click.option("--config", "-c", "config_path", type=click.Path(dir_okay=False), default=None,
              help="YAML of PPORun keys (model, prompts, reward_model, sft_adapter, out_dir, ...) "
                   "and PPOConfig keys, at the top level or under `ppo:`.")
@click.option("--resume", is_flag=True, help="Continue from out_dir/checkpoint if there is one.")
@click.argument("overrides", nargs=-1)
def ppo(config_path, resume, overrides):
    """Refine a policy with PPO against a reward model (LoRA r=1 on one shared base).

    OVERRIDES are KEY=VALUE pairs, e.g. `ppo.steps=50 ppo.learning_rate=1e-5 out_dir=runs/x`.
    """
    from ..config import load_run_config
    from ..ppo import PPOConfig
    from ..ppo.run import PPORun, run_ppo

    run, cfg = load_run_config(config_path, PPORun, PPOConfig, list(overrides), section="ppo")
    result, base_bytes = run_ppo(run, cfg, resume=resume)
    last = result.history[-1] if result.history else {}
    click.echo(f"PPO: {result.steps} steps; mean score {result.mean_score_first:.4g} -> "
               f"{result.mean_score_last:.4g}; KL {last.get('objective/kl', float('nan')):.4g}; "
               f"peak memory {last.get('ppo/memory/peak_bytes', 0) / 2**20:.1f} MiB "
               f"(base weights {base_bytes / 2**20:.1f} MiB)")
    click.echo(f"adapter: {result.adapter_dir}")
