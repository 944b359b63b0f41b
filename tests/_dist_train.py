"""SFT and reward training, data parallel; launched by tests/test_distributed.py.

    mlx.launch --backend ring -n 2 -- python tests/_dist_train.py MODEL_DIR OUT_DIR
    python tests/_dist_train.py MODEL_DIR OUT_DIR            # single process reference

Runs the real trainers (`train_sft`, `train_reward_model`) on a few demo records: SFT with
7 rows in batches of 4 (2 optimizer steps; the second batch of 3 rows leaves one rank a
row short) and held-out rows, then reward training on 6 pairs for one epoch. Rank 0
alone writes out_dir/sft and out_dir/reward; every rank writes out_dir/rank{r}.json (what
it returned, to check that the ranks agree). `--with-step` first runs
tests/_dist_step.py's single averaged step into out_dir/step (one launch for both tests);
`--with-ppo` adds 2 data-parallel PPO steps (2 minibatches each) and 2 GRPO steps, whose
rollouts the ranks sample as one process samples the whole batch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx

from mindprint_mlx import distributed as dist
from mindprint_mlx.data import load_data_dir
from mindprint_mlx.demo import DEMO_CURRICULUM_DIR
from mindprint_mlx.models import load, lora
from mindprint_mlx.grpo import GRPOConfig, train_grpo
from mindprint_mlx.ppo import PPOConfig, train_ppo
from mindprint_mlx.train.reward import RewardConfig, train_reward_model
from mindprint_mlx.train.sft import SFTConfig, train_sft


def main(model_dir: str, out_dir: str, with_step: bool = False, with_ppo: bool = False) -> None:
    rank, size, _ = dist.world()
    out = Path(out_dir)
    if with_step:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import _dist_step

        _dist_step.main(model_dir, str(out / "step"), "sgd", 1)
    ds = load_data_dir(DEMO_CURRICULUM_DIR)
    model, tok = load(model_dir)
    scfg = SFTConfig(lora_rank=4, lora_alpha=8.0, batch_size=4, epochs=1, learning_rate=3e-4, warmup_ratio=0.0,
                     save_every=1, compile=False, max_seq_length=192)
    sft = train_sft(model, tok, list(ds.sft[:7]), scfg, out / "sft", eval_records=list(ds.sft[7:10]),
                    progress=False)
    rcfg = RewardConfig(lora_rank=2, lora_alpha=4.0, batch_size=3, epochs=1, learning_rate=3e-4, max_seq_length=192,
                        val_fraction=0.34, compile=False, log_every=1)
    rew = train_reward_model(model, tok, list(ds.preference[:6]), rcfg, out / "reward", progress=False)
    ppo = None
    if with_ppo:
        # Each rank samples its rows of the whole batch (each row its share of the batch's
        # noise): the run equals one process's, up to float rounding.
        pcfg = PPOConfig(steps=2, batch_size=4, mini_batch_size=2, max_new_tokens=4, ppo_epochs=1,
                         learning_rate=1e-2, lora_rank=2, progress=False, save_every=1,
                         score_norm="running")

        def reward_fn(tokens, lengths):
            return ((tokens % 5) == 0).astype(mx.float32).sum(axis=1) + 0.1 * lengths.astype(mx.float32)

        prompts = [list(r.prompt) for r in ds.sft[:8]]
        res = train_ppo(model, tok, prompts, reward_fn, pcfg, out / "ppo", frozen_adapters=["sft"])
        w = lora.adapter_state(model, "ppo")
        ppo = {"steps": res.steps, "kl_coef": res.history[-1]["objective/kl_coef"],
               "checksum": float(sum(mx.abs(v).sum().item() for v in w.values())),
               "scores": [h["objective/scores"] for h in res.history]}
        gcfg = GRPOConfig(steps=2, batch_size=2, group_size=2, max_new_tokens=4, learning_rate=1e-2,
                          lora_rank=2, progress=False)
        gres = train_grpo(model, tok, prompts, reward_fn, gcfg, out / "grpo", frozen_adapters=["sft"])
        ppo["grpo_scores"] = [h["objective/scores"] for h in gres.history]
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps({
        "size": size, "sft_steps": sft.steps, "sft_train_loss": sft.train_loss,
        "sft_eval_loss": sft.eval_loss, "sft_eval_loss_start": sft.eval_loss_start,
        "reward_val_loss": rew.best_val_loss, "reward_val_accuracy": rew.best_val_accuracy,
        "reward_history": rew.history, "ppo": ppo}))
    dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], "--with-step" in sys.argv[3:], "--with-ppo" in sys.argv[3:])
