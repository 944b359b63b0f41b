"""The `mindprint` command line: a thin shell over the library."""

from __future__ import annotations

import logging
import os
import sys

import click

from ..errors import Interrupted, MindprintError

# Debian/Ubuntu's OpenBLAS: MLX's Linux CPU wheel bundles a reference BLAS that is ~35x
# slower at matmul; preloading OpenBLAS made a LoRA training step 13x faster here.
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3"


def _maybe_preload_openblas() -> None:
    """On Linux, re-run this process once with OpenBLAS preloaded, if it is installed."""
    if not sys.platform.startswith("linux") or os.environ.get("MINDPRINT_NO_OPENBLAS"):
        return
    if os.environ.get("_MINDPRINT_REEXEC") or "openblas" in os.environ.get("LD_PRELOAD", ""):
        return
    if not os.path.exists(OPENBLAS):
        return
    env = dict(os.environ, _MINDPRINT_REEXEC="1",
               LD_PRELOAD=":".join(p for p in (OPENBLAS, os.environ.get("LD_PRELOAD")) if p))
    try:
        os.execve(sys.executable, [sys.executable, "-m", "mindprint_mlx.cli", *sys.argv[1:]], env)
    except OSError:
        pass


def _distributed_rank() -> int:
    """This process's rank under mlx.launch (ring: MLX_RANK; MPI: OMPI_COMM_WORLD_RANK or
    PMI_RANK), without starting the distributed backend; 0 when not launched."""
    for var in ("MLX_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        v = os.environ.get(var)
        if v and v.strip().isdigit():
            return int(v)
    return 0


def _quiet_unless_rank0() -> None:
    """Under mlx.launch only rank 0 prints (output, progress, logs); the other ranks still
    report an error, prefixed with their rank (see MindprintGroup)."""
    if _distributed_rank() == 0:
        return
    devnull = open(os.devnull, "w")
    sys.stdout = sys.stderr = devnull


class MindprintGroup(click.Group):
    """Prints a MindprintError as one line on stderr and exits 1, never a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except Interrupted as e:
            # Ctrl-C during training: the checkpoint is complete; --resume continues exactly.
            if not _distributed_rank():
                click.echo(f"{e} (run the same command with --resume)", err=True)
            ctx.exit(130)
        except MindprintError as e:
            rank = _distributed_rank()
            if rank:
                print(f"[rank {rank}] error: {e}", file=sys.__stderr__, flush=True)
            else:
                click.secho(f"error: {e}", fg="red", err=True)
            ctx.exit(1)


@click.group(cls=MindprintGroup, context_settings={"help_option_names": ["-h", "--help"],
                                                   "max_content_width": 100})
@click.version_option(package_name="mindprint-mlx")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def cli(verbose: bool) -> None:
    """Align an open LLM to one person's voice: LoRA SFT, a learned reward model and PPO
    on MLX, exported to the Hugging Face stack."""
    _quiet_unless_rank0()
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


def main() -> None:
    _maybe_preload_openblas()
    cli(prog_name="mindprint")


# Each module defines one click command or group in a variable named like the module
# (`eval_`, `import_`), imported here in this order.
_COMMANDS = ("demo", "pipeline", "data", "sft", "reward", "label", "ppo", "grpo", "dpo", "ditto", "eval_",
             "generate", "export",
             "import_", "fuse", "plan", "plot")


def _register() -> None:
    import importlib

    for mod in _COMMANDS:
        m = importlib.import_module(f"{__name__}.{mod}")
        cli.add_command(getattr(m, mod))


_register()
