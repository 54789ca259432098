"""Data: shard writing and streaming, sequence builders, the resumable loader, the DataModule, synthetic tasks.

``webdataset`` and ``datasets`` are imported only when shards are read or an HF dataset is loaded.
"""

from dllm_zoo.data.datamodule import TextDiffusionDataModule
from dllm_zoo.data.loader import LoaderPosition, ResumableDataLoader
from dllm_zoo.data.multimodal import (
    BuildTaskRow,
    MMUBuilder,
    MultimodalBuilder,
    R2IBuilder,
    T2IBuilder,
    collate_task_rows,
    make_task_builder,
    row_length,
    t2i_prefix,
    unconditional_t2i_prefix,
)
from dllm_zoo.data.multitask import DataSource, MultiTaskDataModule, SourceMixture, TaskData
from dllm_zoo.data.packing import PackSequences, packed_sample_ids
from dllm_zoo.data.parallel import ParallelDataModule
from dllm_zoo.data.prompts import (
    MULTIMODAL_PROMPT_TASKS,
    CollatePrompts,
    EncodeMultimodalPrompt,
    EncodePrompt,
    MultimodalPromptDataModule,
    PromptDataModule,
    left_pad,
    prompt_token_ids,
)
from dllm_zoo.data.sequences import (
    BuildSequence,
    LMBuilder,
    LMChatBuilder,
    SequenceBuilder,
    SequenceFormat,
    collate_sequences,
    make_builder,
)
from dllm_zoo.data.shards import expand_braces, expand_shards, is_remote, write_shards
from dllm_zoo.data.stream import DataWarning, SampleDropped, SampleStream, is_hf_dataset_dir
from dllm_zoo.data.synthetic import Arithmetic, ShapesWorld, SyntheticTask, extract_answer

__all__ = [
    "Arithmetic",
    "BuildSequence",
    "BuildTaskRow",
    "CollatePrompts",
    "DataSource",
    "DataWarning",
    "EncodePrompt",
    "LMBuilder",
    "LMChatBuilder",
    "LoaderPosition",
    "MMUBuilder",
    "MultiTaskDataModule",
    "MultimodalBuilder",
    "PackSequences",
    "ParallelDataModule",
    "PromptDataModule",
    "MultimodalPromptDataModule",
    "EncodeMultimodalPrompt",
    "MULTIMODAL_PROMPT_TASKS",
    "R2IBuilder",
    "ResumableDataLoader",
    "SampleDropped",
    "SampleStream",
    "SequenceBuilder",
    "SequenceFormat",
    "ShapesWorld",
    "SourceMixture",
    "SyntheticTask",
    "T2IBuilder",
    "TaskData",
    "TextDiffusionDataModule",
    "collate_sequences",
    "collate_task_rows",
    "expand_braces",
    "expand_shards",
    "extract_answer",
    "is_hf_dataset_dir",
    "is_remote",
    "left_pad",
    "make_builder",
    "make_task_builder",
    "packed_sample_ids",
    "prompt_token_ids",
    "row_length",
    "t2i_prefix",
    "unconditional_t2i_prefix",
    "write_shards",
]
