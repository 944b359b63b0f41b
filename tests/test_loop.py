"""The training loop's pure decisions, its state record and the one stop API."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import pytest

from mindprint_mlx.data import load_data_dir
from mindprint_mlx.demo import DEMO_CURRICULUM_DIR
from mindprint_mlx.errors import Interrupted, MindprintError
from mindprint_mlx.models import load
from mindprint_mlx.stop import clear_stop, request_stop, stop_requested
from mindprint_mlx.train.loop import (Sums, TrainState, early_stopping, epochs_for_min_steps,
                                      plan_steps, rank_share, stop_if_requested)
from mindprint_mlx.train.sft import SFTConfig, train_sft


@pytest.fixture(autouse=True)
def _no_stop_left_over():
    clear_stop()
    yield
    clear_stop()


def test_plan_steps_counts_windows_and_caps_at_max_steps():
    assert plan_steps(7, 2) == (14, 14)
    assert plan_steps(7, 2, accumulation=2) == (14, 7)             # the last window is 2 of 14
    assert plan_steps(7, 2, accumulation=3) == (14, 5)             # ... or 2 of 3
    assert plan_steps(7, 3, accumulation=3, max_steps=5) == (15, 5)
    assert plan_steps(7, 1, max_steps=100) == (7, 7)


def test_min_steps_raises_the_epochs_to_the_fewest_that_reach_it():
    assert epochs_for_min_steps(2, 20, min_steps=120) == 60         # 8 rows, batch 4
    assert epochs_for_min_steps(4, 20, min_steps=120) == 30
    assert epochs_for_min_steps(8, 20, min_steps=120) == 20         # 160 steps: already enough
    assert epochs_for_min_steps(2, 20, min_steps=0) == 20           # 0: the epochs decide
    for per_epoch in range(1, 9):
        for acc in (1, 2, 3):
            for min_steps in (1, 5, 10, 17):
                e = epochs_for_min_steps(per_epoch, 1, acc, min_steps)
                assert plan_steps(per_epoch, e, acc)[1] >= min_steps
                assert e == 1 or plan_steps(per_epoch, e - 1, acc)[1] < min_steps


def test_sft_min_steps_runs_more_epochs_of_a_small_dataset(tiny_llama, tmp_path):
    demo = load_data_dir(DEMO_CURRICULUM_DIR)
    cfg = SFTConfig(lora_rank=2, lora_alpha=4.0, batch_size=2, epochs=1, min_steps=5, compile=False,
                    max_seq_length=48)
    model, tok = load(tiny_llama)
    res = train_sft(model, tok, list(demo.sft[:4]), cfg, tmp_path, progress=False)
    assert (res.steps, res.epochs) == (6, 3)                        # 2 steps an epoch: 3 epochs
    assert json.loads((tmp_path / "adapter" / "mindprint.json").read_text())["epochs"] == 3


def test_rank_share_gives_every_rank_the_same_count():
    group = [10, 11, 12, 13, 14]
    assert rank_share(group, 0, 1) == (group, 0)
    assert rank_share(group, 0, 2) == ([10, 12, 14], 0)
    assert rank_share(group, 1, 2) == ([11, 13], 1)
    shares = [rank_share(group, r, 3) for r in range(3)]
    assert [len(m) + f for m, f in shares] == [2, 2, 2]
    assert sorted(i for m, _ in shares for i in m) == group


def test_early_stopping_counts_epochs_without_an_improvement_of_min_delta():
    assert early_stopping(math.inf, 1.0, 0, patience=2, min_delta=0.01) == (True, 0, False)
    assert early_stopping(1.0, 0.995, 0, patience=2, min_delta=0.01) == (False, 1, False)
    assert early_stopping(1.0, 0.995, 1, patience=2, min_delta=0.01) == (False, 2, True)
    assert early_stopping(1.0, 0.9, 1, patience=2, min_delta=0.01) == (True, 0, False)


@dataclass
class _State(TrainState):
    history: list[dict] = field(default_factory=list)


def test_the_state_record_survives_json_exactly():
    st = _State(step=3, micro=7, loss_window=[0.1, 1 / 3], loss_start=None, norm_start=2.5,
                history=[{"epoch": 1}])
    st.window.add(1.0, 1 / 3, {"acc": 0.25}, 17, 0.5)
    st.epoch_sums.add(3, 0.7, {"acc": 0.5}, 40, 1.0)
    back = _State.from_record(json.loads(json.dumps(st.record())), "x")
    assert back == st and back.best == math.inf and isinstance(back.window, Sums)
    assert back.epoch_sums.mean("acc") == 0.5 and back.window.mean() == 1 / 3
    rec = st.record()
    del rec["micro"]
    with pytest.raises(MindprintError, match="x: the checkpoint record has no 'micro'"):
        _State.from_record(rec, "x")


def test_a_stop_request_saves_unless_just_saved_and_raises_interrupted(tmp_path):
    saves, lines = [], []
    stop_if_requested("demo", 3, tmp_path, lambda: saves.append(1), False, lines.append)
    assert saves == [] and lines == []                             # nothing requested
    request_stop()
    assert stop_requested()
    with pytest.raises(Interrupted, match="demo: stopped at step 3 on request; checkpoint in") as e:
        stop_if_requested("demo", 3, tmp_path, lambda: saves.append(1), False, lines.append)
    assert e.value.step == 3 and saves == [1] and "stopped at step 3" in lines[0]
    with pytest.raises(Interrupted):
        stop_if_requested("demo", 4, tmp_path, lambda: saves.append(1), True, lines.append)
    assert saves == [1]                                            # the step had just saved
    assert str(Interrupted("pipeline")) == "pipeline: stopped on request; resume to continue"


def test_a_checkpoint_of_another_format_is_refused_in_one_line(tiny_llama, tmp_path):
    demo = load_data_dir(DEMO_CURRICULUM_DIR)
    cfg = SFTConfig(lora_rank=2, lora_alpha=4.0, batch_size=2, epochs=1, max_steps=2, compile=False,
                    max_seq_length=48)
    model, tok = load(tiny_llama)
    train_sft(model, tok, list(demo.sft[:4]), cfg, tmp_path, progress=False)
    record = tmp_path / "checkpoint" / "state.json"
    st = json.loads(record.read_text())
    assert st["format"] == 2 and st["step"] == 2 and st["micro"] == 2
    st["format"] = 1
    record.write_text(json.dumps(st))
    model, tok = load(tiny_llama)
    with pytest.raises(MindprintError, match=r"checkpoint: a checkpoint of another format .*"
                       r"delete it or run without --resume"):
        train_sft(model, tok, list(demo.sft[:4]), cfg, tmp_path, progress=False, resume=True)
