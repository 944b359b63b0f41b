"""Reward model: Bradley-Terry on demo preference pairs, early stopping, scoring as trained."""

import json

import mlx.core as mx
import numpy as np
import pytest

from mindprint_mlx.data import load_data_dir
from mindprint_mlx.data.batching import encode_pair, pad_id
from mindprint_mlx.demo import DEMO_CURRICULUM_DIR
from mindprint_mlx.errors import MindprintError
from mindprint_mlx.models import load, lora
from mindprint_mlx.train.reward import (RewardConfig, RewardModel, bradley_terry, preference_pairs,
                                        split_pairs, train_reward_model)


@pytest.fixture(scope="module")
def demo():
    return load_data_dir(DEMO_CURRICULUM_DIR)


def test_bradley_terry_loss_and_accuracy_by_hand():
    scores = mx.array([2.0, -1.0, 0.0, 1.0])  # chosen [2, -1], rejected [0, 1]
    loss, acc = bradley_terry(scores, margin=0.0)
    want = np.mean([np.log1p(np.exp(-2.0)), np.log1p(np.exp(2.0))])
    assert abs(loss.item() - want) < 1e-6 and acc.item() == 0.5
    loss_m, _ = bradley_terry(scores, margin=1.0)
    assert abs(loss_m.item() - np.mean([np.log1p(np.exp(-1.0)), np.log1p(np.exp(3.0))])) < 1e-6


def test_split_is_seeded_80_20_and_distinctions_join_when_asked(demo):
    tr, va = split_pairs(64, 0.2, seed=0)
    assert (len(tr), len(va)) == (51, 13) and not set(tr) & set(va)
    assert (tr, va) == split_pairs(64, 0.2, seed=0) and va != split_pairs(64, 0.2, seed=1)[1]
    both = list(demo.preference) + list(demo.distinctions)
    assert len(preference_pairs(both, include_distinctions=True)) == 80
    assert len(preference_pairs(both, include_distinctions=False)) == 64


def test_reward_model_learns_demo_pairs_stops_early_and_scores_as_trained(tiny_demo_model, demo, tmp_path):
    model, tok = load(tiny_demo_model)
    lora.apply_lora(model, "sft", r=2, alpha=2.0, trainable=False)
    assert (RewardConfig().patience, RewardConfig().min_delta) == (3, 0.01)  # the defaults
    cfg = RewardConfig(lora_rank=4, lora_alpha=8.0, batch_size=8, epochs=25, learning_rate=3e-3, patience=2,
                       min_delta=0.01, compile=False, max_seq_length=256)
    pairs = list(demo.preference)[:48]  # 38 train, 10 validation
    res = train_reward_model(model, tok, pairs, cfg, tmp_path, progress=False)

    assert res.best_val_accuracy >= 0.8, res.history  # chance is 0.5
    assert res.stopped_early and res.epochs < 25
    val = [h["reward/val_loss"] for h in res.history]
    assert min(val[-2:]) > min(val[:-2]) - 0.01  # the last `patience` epochs did not improve
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum("reward/train_accuracy" in x for x in lines) == res.epochs  # 5 batches: one line each
    assert sum("reward/val_accuracy" in x for x in lines) == res.epochs
    assert lora.adapter_names(model) == ["sft"]  # training leaves the shared model as it was

    rm = RewardModel.load(model, tok, tmp_path)
    assert lora.get_active(model) and all(a == {"sft"} for a in lora.get_active(model).values())
    p = demo.preference[0]
    chosen, rejected = rm.score_batch([p.prompt, p.prompt], [p.chosen, p.rejected])
    assert chosen > rejected
    assert abs(rm.score(p.prompt, p.chosen) - chosen) < 1e-4
    rows = [encode_pair(tok, p.prompt, r, 256)[0] for r in (p.chosen, p.rejected)]
    T = max(map(len, rows)) + 3
    tokens = mx.array([r + [pad_id(tok)] * (T - len(r)) for r in rows])
    s = rm.score_tokens(tokens, mx.array([len(r) for r in rows]))
    assert s.shape == (2,) and np.allclose(np.array(s), [chosen, rejected], atol=1e-4)
    assert all(a == {"sft"} for a in lora.get_active(model).values())  # active set restored

    from click.testing import CliRunner

    from mindprint_mlx.cli import cli

    r = CliRunner().invoke(cli, ["reward", "score", "-m", str(tiny_demo_model), "-r", str(tmp_path),
                                 "-p", p.prompt[0]["content"], "--response", p.chosen,
                                 "--response", p.rejected])
    assert r.exit_code == 0, r.output
    printed = [float(line.split("\t")[0]) for line in r.output.splitlines()]
    assert np.allclose(printed, [chosen, rejected], atol=1e-3)


def test_validation_split_by_prompt_never_trains_on_a_validation_prompt():
    from mindprint_mlx.train.reward import split_pairs

    prompts = [f"q{i // 3}" for i in range(30)]          # 10 prompts, 3 pairs each
    tr, va = split_pairs(30, 0.2, seed=4, groups=prompts)
    assert sorted(tr + va) == list(range(30)) and len(va) == 6
    assert not {prompts[i] for i in tr} & {prompts[i] for i in va}
    # one pair per prompt: exactly the split without groups (the demo's bits stay)
    for seed in range(5):
        assert split_pairs(17, 0.2, seed, groups=[f"p{i}" for i in range(17)]) == split_pairs(17, 0.2, seed)
    with pytest.raises(MindprintError, match="at least 2 prompts"):
        split_pairs(4, 0.5, 0, groups=["same"] * 4)
