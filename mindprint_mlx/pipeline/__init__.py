"""The curriculum pipeline: reward model once; per topic SFT -> quiz -> PPO when below the
threshold -> final quiz; after each unit merge, verify, continue on the merged weights.

    from mindprint_mlx.pipeline import load_pipeline_config, run_pipeline
    cfg = load_pipeline_config("configs/pipeline.yaml", ["seed=1"])
    result = run_pipeline(cfg, resume=True)
"""

from .config import (EvalSettings, PipelineConfig, RewardSection, VerifySettings,
                     load_pipeline_config, resolved_dict)
from .runner import PipelineResult, run_pipeline, summary
from .state import ResumeError, RunState

__all__ = ["PipelineConfig", "RewardSection", "EvalSettings", "VerifySettings",
           "load_pipeline_config", "resolved_dict", "run_pipeline", "PipelineResult", "summary",
           "RunState", "ResumeError"]
