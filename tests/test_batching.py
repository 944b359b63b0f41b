"""Token layout for every trainer: chat template, completion + EOS, masks, padding, batches."""

import logging

import numpy as np
import pytest

from mindprint_mlx.data.batching import (batch_order, batches, encode_pair, encode_prompt,
                                         encode_records, pad_batch, pad_id)
from mindprint_mlx.models import load

MSGS = [{"role": "user", "content": "When does the cycle turn?"}]


@pytest.fixture(scope="module")
def tok(tiny_llama):
    return load(tiny_llama)[1]


def test_pair_is_chat_template_then_completion_then_eos(tok):
    prompt = tok.apply_chat_template(MSGS, add_generation_prompt=True)
    tokens, n_prompt, cut = encode_pair(tok, MSGS, "Mind the season.", max_len=512)
    assert encode_prompt(tok, MSGS) == prompt
    assert tokens[:n_prompt] == prompt and n_prompt == len(prompt)
    assert tokens[n_prompt:] == tok.encode("Mind the season.", add_special_tokens=False) + [tok.eos_token_id]
    assert cut is False
    assert encode_prompt(tok, "When does the cycle turn?") == prompt  # a string is one user message


def test_mask_covers_completion_and_eos_only_and_pads_with_pad_not_eos(tok):
    a, na, _ = encode_pair(tok, MSGS, "Mind the season.", 512)
    b, nb, _ = encode_pair(tok, MSGS, "Patience through every season of the cycle.", 512)
    tokens, mask = pad_batch([a, b], [na, nb], pad_id(tok))
    tokens, mask = np.array(tokens), np.array(mask)
    assert tokens.dtype == np.int32 and mask.dtype == np.float32
    assert tokens.shape == mask.shape == (2, max(len(a), len(b)))
    assert pad_id(tok) != tok.eos_token_id
    assert (tokens[0, len(a):] == pad_id(tok)).all()
    assert mask[0].tolist() == [0.0] * na + [1.0] * (len(a) - na) + [0.0] * (tokens.shape[1] - len(a))
    assert mask[1].sum() == len(b) - nb
    assert tokens[0, len(a) - 1] == tok.eos_token_id and mask[0, len(a) - 1] == 1.0
    padded, _ = pad_batch([a], [na], pad_id(tok), pad_to_multiple=16)
    assert padded.shape[1] % 16 == 0


def test_truncation_is_flagged_counted_and_warned(tok, caplog):
    long = "the cycle turns " * 60
    tokens, n_prompt, cut = encode_pair(tok, MSGS, long, max_len=32)
    assert cut is True and len(tokens) == 32 and n_prompt < 32
    long_prompt = [{"role": "user", "content": long}]
    tokens, n_prompt, cut = encode_pair(tok, long_prompt, "Mind the season.", max_len=32)
    assert cut and len(tokens) == 32 and 32 - n_prompt >= 8  # room kept for the answer
    with caplog.at_level(logging.WARNING):
        rows, n_cut = encode_records(tok, [(MSGS, long), (MSGS, "short")], max_len=32)
    assert n_cut == 1 and len(rows) == 2
    assert "1 of 2" in caplog.text and "max_len=32" in caplog.text


def test_batches_are_seeded_length_sorted_and_cover_every_item_once():
    rng = np.random.default_rng(0)
    items = [list(range(int(n))) for n in rng.integers(1, 100, size=37)]
    a = list(batches(items, 4, seed=3))
    assert a == list(batches(items, 4, seed=3))
    assert a != list(batches(items, 4, seed=4))
    order = batch_order([len(x) for x in items], 4, seed=3)
    assert sorted(i for g in order for i in g) == list(range(37))
    assert sorted(len(g) for g in order) == [1] + [4] * 9
    # Length-sorted: the batches are consecutive runs of the sorted lengths.
    spans = sorted((min(len(items[i]) for i in g), max(len(items[i]) for i in g)) for g in order)
    assert all(hi <= nxt_lo for (_, hi), (nxt_lo, _) in zip(spans, spans[1:]))
    plain = batch_order([len(x) for x in items], 4, seed=0, shuffle=False, sort_by_length=False)
    assert plain[0] == [0, 1, 2, 3]
