"""Exports: PEFT adapters (and back), reward models as SEQ_CLS adapters, fused Hugging
Face checkpoints, model cards, hub upload."""

from .card import find_report, model_card
from .fuse import FuseResult, fuse
from .hub import push_to_hub
from .names import NAME_MAPS, NameMap, name_map
from .peft import ExportResult, export_peft, export_reward, import_peft, svd_compress

__all__ = ["ExportResult", "FuseResult", "NAME_MAPS", "NameMap", "export_peft", "export_reward",
           "find_report", "fuse", "import_peft", "model_card", "name_map", "push_to_hub",
           "svd_compress"]
