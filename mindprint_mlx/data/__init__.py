"""Curriculum data: records, validated loading, curriculum grouping, quality and adaptive plans.

See records.py for the file formats. `mindprint_mlx.data.batching` (tokenisation, masks,
padding) is imported on its own: `from mindprint_mlx.data.batching import ...`.
"""

from .records import (CURRICULUM_KEYS, DEFAULT_GROUP, ROLES, DataError, DataFiles, Dataset,
                      DistinctionRecord, Message, Persona, PreferenceRecord, Problem, PromptRecord,
                      QuizRecord, SFTRecord, curriculum_texts, load_data_dir, load_persona,
                      load_records_file, parse_record)
from .curriculum import (Chapter, Curriculum, Topic, Unit, build_curriculum, load_curriculum,
                         natural_key, natural_sorted)
from .quality import (QualityReport, QualityThresholds, TopicQuality, quality_report,
                      render_markdown, topic_quality)
from .adaptive import AdaptiveBounds, TopicPlan, decide, load_bounds

__all__ = [
    "CURRICULUM_KEYS", "DEFAULT_GROUP", "ROLES", "DataError", "DataFiles", "Dataset",
    "DistinctionRecord", "Message", "Persona", "PreferenceRecord", "Problem", "PromptRecord",
    "QuizRecord", "SFTRecord", "curriculum_texts", "load_data_dir", "load_persona", "load_records_file", "parse_record",
    "Chapter", "Curriculum", "Topic", "Unit", "build_curriculum", "load_curriculum",
    "natural_key", "natural_sorted",
    "QualityReport", "QualityThresholds", "TopicQuality", "quality_report", "render_markdown",
    "topic_quality", "AdaptiveBounds", "TopicPlan", "decide", "load_bounds",
]
