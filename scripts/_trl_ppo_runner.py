#!/usr/bin/env python
"""The TRL side of scripts/bench_ppo_vs_trl.py; runs inside the TRL virtualenv, never the project's.

    python _trl_ppo_runner.py SPEC.json     # prints one JSON object on its last stdout line

SPEC: {"model_dir", "prompts": [[token ids], ...], "new_tokens", "lora_rank", "lora_alpha",
"lora_targets", "ppo_epochs", "mini_batch_size", "steps", "warmup", "threads", "seed"}.
TRL 0.11.4's classic PPOTrainer with a peft LoRA (the reference is the base, adapters
disabled), batched `generate` with min_new_tokens = max_new_tokens (every response has exactly
`new_tokens` tokens), the same cheap score as the mindprint side (share of even token ids).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore")


def main() -> int:
    spec = json.load(open(sys.argv[1]))
    import torch

    torch.set_num_threads(int(spec["threads"]))
    import numpy as np
    import peft
    import transformers
    import trl
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

    transformers.logging.set_verbosity_error()
    torch.manual_seed(spec["seed"])
    np.random.seed(spec["seed"])
    tok = AutoTokenizer.from_pretrained(spec["model_dir"])
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    lcfg = LoraConfig(r=spec["lora_rank"], lora_alpha=spec["lora_alpha"],
                      target_modules=list(spec["lora_targets"]), lora_dropout=0.0, bias="none",
                      task_type="CAUSAL_LM")
    # dropout off in the value head, as mindprint's
    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        spec["model_dir"], peft_config=lcfg, torch_dtype=torch.float32, summary_dropout_prob=0.0)
    B = len(spec["prompts"])
    cfg = PPOConfig(batch_size=B, mini_batch_size=spec["mini_batch_size"],
                    gradient_accumulation_steps=1, ppo_epochs=spec["ppo_epochs"],
                    learning_rate=1.41e-5, seed=spec["seed"], log_with=None)
    trainer = PPOTrainer(cfg, model, ref_model=None, tokenizer=tok)
    queries = [torch.tensor(p, dtype=torch.long) for p in spec["prompts"]]
    n = spec["new_tokens"]
    gen_kwargs = dict(min_new_tokens=n, max_new_tokens=n, do_sample=True, top_k=0, top_p=1.0,
                      temperature=1.0, pad_token_id=tok.pad_token_id)

    rows = []
    for i in range(spec["warmup"] + spec["steps"]):
        t0 = time.perf_counter()
        responses = trainer.generate(queries, batch_size=B, return_prompt=False, **gen_kwargs)
        t1 = time.perf_counter()
        scores = [torch.tensor(float((torch.cat([q, r]) % 2 == 0).float().mean()))
                  for q, r in zip(queries, responses)]
        t2 = time.perf_counter()
        stats = trainer.step(queries, responses, scores)
        t3 = time.perf_counter()
        n_tok = sum(len(r) for r in responses)
        rows.append({"generation": t1 - t0, "scoring": t2 - t1,
                     "forward": float(stats["time/ppo/forward_pass"]),
                     "advantages": float(stats["time/ppo/compute_rewards"]
                                         + stats["time/ppo/compute_advantages"]),
                     "update": float(stats["time/ppo/optimize_step"]),
                     "stats": float(stats["time/ppo/calc_stats"]),
                     "step": t3 - t0, "response_tokens": n_tok})
    kept = rows[spec["warmup"]:]
    med = {k: statistics.median(r[k] for r in kept) for k in kept[0]}
    med["tokens_per_sec"] = statistics.median(r["response_tokens"] / r["step"] for r in kept)
    med["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                       "trl": trl.__version__, "peft": peft.__version__,
                       "threads": torch.get_num_threads()}
    med["steps"] = [{k: r[k] for k in ("step", "generation", "forward", "update")} for r in kept]
    print(json.dumps(med))
    return 0


if __name__ == "__main__":
    sys.exit(main())
