"""The pipeline on each chat-template family the tiny builder knows (Qwen2.5, Llama 3.x,
Gemma 3, SmolLM2, Mistral): their own templates, special tokens and EOS sets."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import numpy as np
import pytest

from mindprint_mlx.data.batching import (chat_messages, encode_prompt, encode_records, eos_ids,
                                         pad_batch, pad_id, turn_end_id)
from mindprint_mlx.errors import MindprintError
from mindprint_mlx.models import load, lora
from mindprint_mlx.models.adapters import save_adapter

# family -> (arch it ships with, the token that ends an assistant turn, generation EOS tokens)
FAMILIES = {
    "qwen2.5": ("qwen2", "<|im_end|>", {"<|im_end|>", "<|endoftext|>"}),
    "llama3": ("llama", "<|eot_id|>", {"<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"}),
    "gemma3": ("gemma3_text", "<end_of_turn>", {"<end_of_turn>", "<eos>"}),
    "smollm2": ("llama", "<|im_end|>", {"<|im_end|>"}),
    "mistral": ("llama", "</s>", {"</s>"}),
}
SYSTEM = "Answer with great care."
QUESTION = "Why does the teacher read the book?"
ANSWER = "The teacher reads the book to learn something new."

# Where each family's template puts a system message (and its default one without any).
WITH_SYSTEM = {
    "qwen2.5": f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{QUESTION}<|im_end|>\n"
               "<|im_start|>assistant\n",
    "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge "
              f"Date: December 2023\nToday Date: 26 Jul 2024\n\n{SYSTEM}<|eot_id|>"
              f"<|start_header_id|>user<|end_header_id|>\n\n{QUESTION}<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "gemma3": f"<bos><start_of_turn>user\n{SYSTEM}\n\n{QUESTION}<end_of_turn>\n<start_of_turn>model\n",
    "smollm2": f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{QUESTION}<|im_end|>\n"
               "<|im_start|>assistant\n",
    # no system role: mindprint prepends the system text to the first user turn
    "mistral": f"<s>[INST] {SYSTEM}\n\n{QUESTION} [/INST]",
}
WITHOUT_SYSTEM = {
    "qwen2.5": "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
               f"assistant.<|im_end|>\n<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge "
              "Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
              f"<|start_header_id|>user<|end_header_id|>\n\n{QUESTION}<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "gemma3": f"<bos><start_of_turn>user\n{QUESTION}<end_of_turn>\n<start_of_turn>model\n",
    "smollm2": "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
               f"Face<|im_end|>\n<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n",
    "mistral": f"<s>[INST] {QUESTION} [/INST]",
}

TEXTS = ["hi there", "the teacher reads", "why does it rain", "a small boat"]


@pytest.fixture(scope="module")
def family_model(tmp_path_factory):
    from mindprint_mlx.models.tiny import build_tiny_model

    built = {}

    def get(family):
        if family not in built:
            built[family] = build_tiny_model(tmp_path_factory.mktemp(family) / "model",
                                             arch=FAMILIES[family][0], chat_template=family)
        return built[family]
    return get


def _tok_id(tok, text):
    return tok.convert_tokens_to_ids(text)


def test_unknown_family_is_a_one_line_error(tmp_path):
    from mindprint_mlx.models.tiny import build_tiny_model

    with pytest.raises(MindprintError, match=r"^tiny model: chat_template must be one of chatml, "
                                             r"qwen2\.5, llama3, gemma3, smollm2, mistral, got 'phi3'$"):
        build_tiny_model(tmp_path / "m", chat_template="phi3")


@pytest.mark.parametrize("family", FAMILIES)
def test_family_layout_and_eos_set(family, family_model):
    base = family_model(family)
    _, tok = load(base)
    arch, end, gen_eos = FAMILIES[family]
    gen = json.loads((base / "generation_config.json").read_text())
    listed = gen["eos_token_id"] if isinstance(gen["eos_token_id"], list) else [gen["eos_token_id"]]
    assert {tok.convert_ids_to_tokens(i) for i in listed} == gen_eos
    # mlx-lm reads the generation config's set; mindprint stops at all of it
    assert set(tok.eos_token_ids) == {_tok_id(tok, t) for t in gen_eos}
    assert eos_ids(tok) == sorted(_tok_id(tok, t) for t in gen_eos)
    assert turn_end_id(tok) == _tok_id(tok, end)
    assert pad_id(tok) not in (turn_end_id(tok), tok.eos_token_id)
    cfg = json.loads((base / "tokenizer_config.json").read_text())
    from mindprint_mlx.models.tiny import CHAT_FAMILIES
    assert cfg["chat_template"] == CHAT_FAMILIES[family].template


@pytest.mark.parametrize("family", FAMILIES)
def test_system_prompt_goes_where_the_template_puts_it(family, family_model):
    _, tok = load(family_model(family))
    with_sys = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    assert tok.decode(encode_prompt(tok, with_sys)) == WITH_SYSTEM[family]
    assert tok.decode(encode_prompt(tok, QUESTION)) == WITHOUT_SYSTEM[family]
    # one BOS at most: the template writes it, tokenizing the rendered text adds none
    ids = encode_prompt(tok, with_sys)
    if tok.bos_token_id is not None and family != "smollm2":     # SmolLM2's bos is <|im_start|>
        assert ids.count(tok.bos_token_id) == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_completion_mask_is_exactly_the_assistant_turn_and_its_end(family, family_model):
    _, tok = load(family_model(family))
    end = FAMILIES[family][1]
    prompts = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}],
               [{"role": "user", "content": "hi there"}]]
    completions = [ANSWER, "a small boat"]
    rows, _ = encode_records(tok, list(zip(prompts, completions)), 256)
    tokens, mask = pad_batch([r for r, _ in rows], [n for _, n in rows], pad_id(tok), 8)
    tokens, mask = np.array(tokens), np.array(mask)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        masked = tokens[i][mask[i] > 0].tolist()
        assert tok.decode(masked) == c + end
        assert masked[-1] == _tok_id(tok, end)
        # the row is the template's own rendering of the whole conversation, up to the end token
        convo = chat_messages(tok, p) + [{"role": "assistant", "content": c}]
        full = tok.apply_chat_template(convo, tokenize=False)
        full_ids = tok.encode(full, add_special_tokens=False)
        assert rows[i][0] == full_ids[:len(rows[i][0])]


class _Forced:
    """`model` whose output layer makes `token` the likeliest from the `at`-th generated token
    on (counting output-layer calls on one position: the prompt's last, then one per token),
    and never emits the `suppress` ids before that."""

    def __init__(self, model, token: int | None, at: int, suppress=()):
        self.inner, self.model, self.args = model, model.model, getattr(model, "args", None)
        self.token, self.at, self.calls = token, at, 0
        self.suppress = list(suppress)

    def __contains__(self, key):
        return key == "lm_head"

    @property
    def layers(self):
        return self.inner.layers

    def make_cache(self):
        from mlx_lm.models.cache import make_prompt_cache
        return make_prompt_cache(self.inner)

    def lm_head(self, h):
        from mindprint_mlx.models.heads import lm_logits
        logits = lm_logits(self.inner, h)
        vocab = mx.arange(logits.shape[-1])
        if self.calls >= self.at:
            logits = logits + 1e4 * (vocab == self.token)
        elif self.suppress:
            logits = logits - 1e4 * (vocab[:, None] == mx.array(self.suppress)).any(axis=-1)
        self.calls += 1
        return logits


@pytest.mark.parametrize("family", FAMILIES)
def test_every_eos_id_stops_rollouts_and_quiz_answers(family, family_model):
    from mindprint_mlx.evaluate import greedy_answers
    from mindprint_mlx.ppo.rollout import generate_batch

    model, tok = load(family_model(family))
    prompts = [[{"role": "user", "content": t}] for t in TEXTS]
    enc = [encode_prompt(tok, p) for p in prompts]
    stops = eos_ids(tok)
    assert len(stops) == len(FAMILIES[family][2])
    free = generate_batch(_Forced(model, None, 99, stops), enc, 3, stops, pad_id(tok), temperature=0.0)
    for e in stops:
        g = generate_batch(_Forced(model, e, 3, stops), enc, 8, stops, pad_id(tok), temperature=0.0)
        assert np.array(g.ended).all()
        assert np.array(g.response_lengths).tolist() == [4] * len(TEXTS)
        resp = np.array(g.response_tokens)
        assert (resp[:, 3] == e).all() and (resp[:, 4:] == pad_id(tok)).all()
        assert resp[:, :3].tolist() == np.array(free.response_tokens).tolist()
        answers = greedy_answers(_Forced(model, e, 3, stops), tok, prompts, max_tokens=8)
        assert answers == [tok.decode(r[:3]) for r in resp.tolist()]
    # a token that is not an EOS does not stop anything
    other = next(i for i in range(300, 400) if i not in stops)
    g = generate_batch(_Forced(model, other, 1, stops), enc, 5, stops, pad_id(tok), temperature=0.0)
    assert not np.array(g.ended).any() and np.array(g.response_lengths).tolist() == [5] * len(TEXTS)


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_export_and_fuse_keep_tokenizer_and_chat_template(family, family_model, tmp_path):
    import transformers

    from mindprint_mlx.export import export_peft, fuse

    base = family_model(family)
    model, tok = load(base)
    lora.apply_lora(model, "sft", r=2, alpha=4.0)
    save_adapter(model, "sft", tmp_path / "sft")
    export_peft(tmp_path / "sft", tmp_path / "peft", model=str(base))
    fuse(base, tmp_path / "sft", tmp_path / "fused")
    convos = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}],
              [{"role": "user", "content": QUESTION}]]
    for out in ("peft", "fused"):
        d = tmp_path / out
        for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            assert (d / f).read_bytes() == (base / f).read_bytes(), (out, f)
        hf = transformers.AutoTokenizer.from_pretrained(d)
        gen = transformers.GenerationConfig.from_pretrained(d)
        listed = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
        assert sorted(listed) == eos_ids(tok)
        for msgs in convos:
            # transformers on mindprint's layout (a system turn folded where the template has none)
            theirs = hf.apply_chat_template(chat_messages(tok, msgs), add_generation_prompt=True)
            theirs = theirs["input_ids"] if "input_ids" in theirs else theirs
            assert list(theirs) == encode_prompt(tok, msgs)
    _, fused_tok = load(tmp_path / "fused")
    assert set(fused_tok.eos_token_ids) == set(tok.eos_token_ids)
    for msgs in convos:
        assert encode_prompt(fused_tok, msgs) == encode_prompt(tok, msgs)


@pytest.mark.parametrize("family", FAMILIES)
def test_sft_then_ppo_run_on_each_family(family, family_model, tmp_path):
    from mindprint_mlx.ppo import PPOConfig, train_ppo
    from mindprint_mlx.train.sft import SFTConfig, train_sft

    model, tok = load(family_model(family))
    records = [([{"role": "system", "content": SYSTEM}, {"role": "user", "content": t}],
                f"{t}: the teacher reads the book.") for t in TEXTS]
    records += [([{"role": "user", "content": t}], "a small boat near the river.") for t in TEXTS]
    res = train_sft(model, tok, records, SFTConfig(epochs=1, batch_size=2, max_steps=4, learning_rate=1e-3,
                                                   lora_rank=2, save_every=100, warmup_ratio=0.0),
                    tmp_path / "sft", progress=False)
    assert res.steps == 4 and math.isfinite(res.train_loss)
    end = turn_end_id(tok)

    def reward_fn(tokens, lengths):   # reward ending the turn properly
        t, n = np.array(tokens), np.array(lengths)
        return mx.array([float(t[i, n[i] - 1] == end) for i in range(len(n))])
    cfg = PPOConfig(steps=2, batch_size=4, mini_batch_size=2, max_new_tokens=4, learning_rate=1e-3,
                    progress=False, save_every=0)
    out = train_ppo(model, tok, [r[0] for r in records], reward_fn, cfg, tmp_path / "ppo",
                    frozen_adapters=["sft"])
    assert len(out.history) == 2
    for h in out.history:
        assert all(math.isfinite(v) for v in h.values() if isinstance(v, float)), h
        assert abs(h["ppo/first_minibatch_ratio_mean"] - 1) < 1e-4
