"""Where mlx-lm and transformers put the same linear layer.

mlx-lm keeps transformers' parameter names for most text models, so an adapter tensor
`model.layers.3.self_attn.o_proj.lora_a` belongs to the module that transformers calls
`model.layers.3.self_attn.o_proj` too. Where the decoder layers live elsewhere (the
multimodal Gemma 3: mlx-lm `language_model.model.layers`, transformers 5
`model.language_model.layers`), or a module has no transformers counterpart (mlx-lm's
stacked `switch_mlp` experts), the table below says so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ..errors import MindprintError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NameMap:
    """Module paths of one architecture in mlx-lm and in transformers' *ForCausalLM."""

    model_type: str
    mlx_layers: str = "model.layers"       # decoder layer list in mlx-lm's parameter tree
    hf_layers: str = "model.layers"        # the same list in transformers' loaded model
    # within-layer paths that differ: mlx-lm path -> transformers path
    modules: dict = field(default_factory=dict)
    # within-layer path fragments with no transformers equivalent (LoRA there cannot map)
    unmappable: tuple = ()
    # transformers' model holds other stacks with the same layer names (a vision tower):
    # PEFT target_modules must then be a regex anchored at hf_layers
    anchored_targets: bool = False
    verified: bool = False                 # checked against transformers by this package's tests

    def to_hf(self, mlx_module: str) -> str:
        """`model.layers.0.self_attn.o_proj` (mlx-lm) -> transformers' module path."""
        layer, rest = self.split_mlx(mlx_module)
        for frag in self.unmappable:
            if frag in rest.split("."):
                raise MindprintError(
                    f"{mlx_module}: mlx-lm's '{frag}' (stacked experts) has no module-by-module "
                    f"equivalent in transformers' {self.model_type}; a LoRA on it cannot be exported")
        rest = self.modules.get(rest, rest)
        return f"{self.hf_layers}.{layer}.{rest}"

    def to_mlx(self, hf_module: str) -> str:
        """The inverse of `to_hf`."""
        prefix = self.hf_layers + "."
        if not hf_module.startswith(prefix):
            raise MindprintError(
                f"{hf_module}: not inside the decoder layers ('{self.hf_layers}') of a "
                f"{self.model_type} model; LoRA outside the decoder layers cannot be imported")
        layer, rest = hf_module[len(prefix):].split(".", 1)
        inverse = {v: k for k, v in self.modules.items()}
        return f"{self.mlx_layers}.{int(layer)}.{inverse.get(rest, rest)}"

    def split_mlx(self, mlx_module: str) -> tuple[int, str]:
        prefix = self.mlx_layers + "."
        if not mlx_module.startswith(prefix):
            raise MindprintError(
                f"{mlx_module}: not inside the decoder layers ('{self.mlx_layers}') of a "
                f"{self.model_type} model")
        layer, rest = mlx_module[len(prefix):].split(".", 1)
        return int(layer), rest


def _same(model_type: str, verified: bool = False) -> NameMap:
    return NameMap(model_type, verified=verified)


# mlx-lm 0.32 vs transformers 5. "verified": a test here loads both and compares logits.
NAME_MAPS: dict[str, NameMap] = {
    "llama": _same("llama", verified=True),
    "qwen2": _same("qwen2", verified=True),
    "qwen3": _same("qwen3", verified=True),
    "gemma3_text": _same("gemma3_text", verified=True),
    "mistral": _same("mistral"),
    "gemma": _same("gemma"),
    "gemma2": _same("gemma2"),
    "phi3": _same("phi3"),
    "smollm3": _same("smollm3"),
    "olmo2": _same("olmo2"),
    "granite": _same("granite"),
    "starcoder2": _same("starcoder2"),
    "gemma3": NameMap("gemma3", mlx_layers="language_model.model.layers",
                      hf_layers="model.language_model.layers", anchored_targets=True),
    "qwen2_moe": NameMap("qwen2_moe", unmappable=("switch_mlp",)),
    "qwen3_moe": NameMap("qwen3_moe", unmappable=("switch_mlp",)),
    "mixtral": NameMap("mixtral", unmappable=("switch_mlp",)),
}


def name_map(model_type: str | None) -> NameMap:
    """The map for `model_type`; unknown types get the identity map (with a warning)."""
    if model_type in NAME_MAPS:
        return NAME_MAPS[model_type]
    log.warning("model type %r is not in mindprint's name-map table; assuming mlx-lm and "
                "transformers use the same module paths (model.layers.N...)", model_type)
    return NameMap(str(model_type))
