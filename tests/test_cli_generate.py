"""`mindprint generate`: chat-templated answers, adapters stacked, --compare side by side."""

import os
import subprocess
import sys

import mlx.core as mx
import pytest
from click.testing import CliRunner

from mindprint_mlx.cli import cli
from mindprint_mlx.generate import generate_text, side_by_side
from mindprint_mlx.models import load, lora
from mindprint_mlx.models.adapters import save_adapter

PROMPT = "the teacher reads a letter"
GEN = ["--max-tokens", "10", "--temp", "0"]


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory):
    """Two saved adapters strong enough to change greedy answers, and the expected texts."""
    model, tok = load(tiny_llama)
    out = tmp_path_factory.mktemp("cli-adapters")
    dirs = []
    for i, name in enumerate(("one", "two")):
        mx.random.seed(10 + i)  # A's init and B: the same adapters on every run
        lora.apply_lora(model, name, r=2, alpha=8.0)
        for _, m in lora.lora_layers(model):
            if name in m.adapters:
                m.adapters[name].lora_b = mx.random.normal(m.adapters[name].lora_b.shape)
        dirs.append(save_adapter(model, name, out / name))
    kw = dict(max_tokens=10, temp=0.0)
    with lora.active_adapters(model, []):
        base = generate_text(model, tok, PROMPT, **kw)
    with lora.active_adapters(model, ["one"]):
        one = generate_text(model, tok, PROMPT, **kw)
    with lora.active_adapters(model, ["one", "two"]):
        both = generate_text(model, tok, PROMPT, **kw)
    assert len({base, one, both}) == 3, "the adapters should change the greedy answer"
    return dirs, {"base": base, "one": one, "both": both}


def run(*args):
    result = CliRunner().invoke(cli, list(map(str, args)))
    assert "Traceback" not in result.output
    return result


def test_compare_prints_base_and_adapted_side_by_side(tiny_llama, adapters):
    dirs, expected = adapters
    result = run("generate", "--model", tiny_llama, "--adapter", dirs[0], "--prompt", PROMPT,
                 "--compare", *GEN)
    assert result.exit_code == 0, result.output
    base, tuned = expected["base"], expected["one"]
    # streamed answers first (base, then adapted), then the two side by side
    assert result.output == (f"--- base ---\n{base}\n"
                             f"--- adapted: {dirs[0]} ---\n{tuned}\n\n"
                             f"{side_by_side(base, tuned)}\n")
    table = side_by_side(base, tuned).splitlines()
    assert table[0].startswith("base ") and table[0].rstrip().endswith("| adapted")


def test_stacked_adapters_without_compare(tiny_llama, adapters):
    dirs, expected = adapters
    result = run("generate", "-m", tiny_llama, "-a", dirs[0], "-a", dirs[1], "-p", PROMPT, *GEN)
    assert result.exit_code == 0, result.output
    assert result.output == f"--- adapted ---\n{expected['both']}\n"
    result = run("generate", "-m", tiny_llama, "-p", PROMPT, *GEN)
    assert result.exit_code == 0, result.output
    assert result.output == f"--- base ---\n{expected['base']}\n"


def test_bad_model_is_one_line_error(tmp_path, tiny_llama):
    result = run("generate", "--model", tmp_path / "BAD", "--prompt", "hi")
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [f"error: model path not found: {tmp_path / 'BAD'}"]
    not_adapter = tmp_path / "empty"
    not_adapter.mkdir()
    result = run("generate", "--model", tiny_llama, "--adapter", not_adapter, "--prompt", "hi")
    assert result.exit_code == 1
    assert result.output.startswith("error: ") and "not an mlx-lm adapter directory" in result.output


def test_bad_model_from_the_shell(tmp_path):
    # through the console script's entry point, which (on Linux with OpenBLAS installed)
    # restarts itself once with OpenBLAS preloaded
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    env["HF_HUB_OFFLINE"] = "1"
    code = ("import sys; from mindprint_mlx.cli import main; "
            "sys.argv = ['mindprint', 'generate', '--model', 'BAD', '--prompt', 'hi']; main()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip() == "error: model path not found: BAD"
    assert "Traceback" not in proc.stderr + proc.stdout
