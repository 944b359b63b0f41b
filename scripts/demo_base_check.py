#!/usr/bin/env python
"""Does the `mindprint demo` base model speak? Builds (or reuses) the pretrained demo
model, answers every held-out prompt (mindprint_mlx/demo/heldout_prompts.jsonl, in no
data file) greedily, and prints: the share of answers made of real words
(`evaluate.is_real_words` against `evaluate.demo_lexicon`), their mean real-word
fraction, the persona's voice markers in them (a neutral base: about 0), how many answers
are distinct, and a few examples; and how well it knows new sentences of its domain: the
mean per-token negative log-likelihood of the curriculum's quiz reference answers (held out
from every training set) against a uniform guess's log V, which is the quiz's `likelihood`
part (1 - NLL / log V).

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 \\
        python scripts/demo_base_check.py [--cache DIR] [-a ADAPTER ...] [--max-tokens 64] [--json OUT]

With an empty --cache the first call pretrains the model (its wall time is printed).
"""

from __future__ import annotations

import argparse
import math
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", default=None, help="model cache dir (default: the demo's)")
    ap.add_argument("--model", default=None, help="a model dir instead of the demo model")
    ap.add_argument("--adapter", "-a", action="append", default=[],
                    help="adapter dir (mlx-lm format) to answer with; repeat to stack")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--examples", type=int, default=3)
    ap.add_argument("--json", default=None, help="write the numbers and answers here")
    args = ap.parse_args(argv)

    from mindprint_mlx.data import load_data_dir
    from mindprint_mlx.demo import DEMO_CURRICULUM_DIR, heldout_prompts
    from mindprint_mlx.evaluate import (demo_lexicon, is_real_words, likelihood_score, marker_count,
                                        quiz_items, real_word_fraction, reference_likelihood)
    from mindprint_mlx.generate import generate_text
    from mindprint_mlx.io import atomic_write_json
    from mindprint_mlx.models import load
    from mindprint_mlx.models.tiny import demo_model

    t0 = time.perf_counter()
    path = args.model or demo_model(args.cache)
    build_s = time.perf_counter() - t0
    model, tok = load(path)
    from mindprint_mlx.models import lora
    from mindprint_mlx.models.adapters import load_adapter

    names = [load_adapter(model, a, name=f"adapter{i}") for i, a in enumerate(args.adapter)]
    data = load_data_dir(DEMO_CURRICULUM_DIR, require=())
    markers = data.persona.voice_markers
    lexicon = demo_lexicon()
    rows = []
    for p in heldout_prompts():
        with lora.active_adapters(model, names):
            a = generate_text(model, tok, p, max_tokens=args.max_tokens, temp=0.0)
        rows.append({"prompt": p, "answer": a, "real_word_fraction": real_word_fraction(a, lexicon),
                     "real_words": is_real_words(a, lexicon), "markers": marker_count(a, markers)})
    items = quiz_items([(q.question, q.reference_answer) for q in data.quiz])   # the quiz's layout
    with lora.active_adapters(model, names):
        lps = reference_likelihood(model, tok, [list(it.messages) for it in items],
                                   [it.reference for it in items])
    nll = -sum(lps) / len(lps)
    vocab = model.args.vocab_size
    log_v = math.log(vocab)
    n = len(rows)
    out = {"model": str(path), "adapters": args.adapter, "build_or_load_seconds": build_s, "prompts": n,
           "real_words_share": sum(r["real_words"] for r in rows) / n,
           "mean_real_word_fraction": sum(r["real_word_fraction"] for r in rows) / n,
           "marker_count": sum(r["markers"] for r in rows),
           "answers_with_markers": sum(r["markers"] > 0 for r in rows),
           "distinct_answers": len({r["answer"].strip() for r in rows}),
           "quiz_reference_nll": nll, "log_vocab": log_v,
           "quiz_likelihood_part": likelihood_score(-nll, vocab), "answers": rows}
    print(f"model: {path} (ready in {build_s:.1f}s)" +
          (f"; adapters: {', '.join(args.adapter)}" if args.adapter else ""))
    print(f"held-out prompts: {n}; answers made of real words: {out['real_words_share']:.2f} "
          f"(mean real-word fraction {out['mean_real_word_fraction']:.3f}); voice markers: "
          f"{out['marker_count']} in {out['answers_with_markers']} answers; distinct answers: "
          f"{out['distinct_answers']}/{n}")
    print(f"quiz reference answers ({len(lps)}, never trained on): {nll:.2f} nats a token against "
          f"a uniform guess's {log_v:.2f} (the quiz's likelihood part {out['quiz_likelihood_part']:.3f})")
    for r in rows[:args.examples]:
        print(f"\nQ: {r['prompt']}\nA: {r['answer']}")
    if args.json:
        atomic_write_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
