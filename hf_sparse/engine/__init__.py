"""The layer-by-layer calibration engine, written once and shared by every pruning method.

One room per concern; data flows down this list:

- :mod:`~hf_sparse.engine.planning`: which operators of which blocks are pruned, to which sparsity, in which groups;
- :mod:`~hf_sparse.engine.capture`: the first block's calibration inputs, and running a block on them;
- :mod:`~hf_sparse.engine.statistics`: the registry of statistics a method can ask for, and the hooks collecting them;
- :mod:`~hf_sparse.engine.devices`: where a block computes, and every read and write of a parameter (offload too);
- :mod:`~hf_sparse.engine.pipelines`: how blocks are scheduled (data-free, sequential, threaded, distributed,
  structured);
- :mod:`~hf_sparse.engine.structured`: what a structured method may measure on the dense model, and applying its edits;
- :mod:`~hf_sparse.engine.layerwise`: :class:`LayerwiseEngine`, pruning one block and running the pipeline;
- :mod:`~hf_sparse.engine.protocol`: what the engine asks of a method (the methods are a layer above).

>>> engine = LayerwiseEngine(build_method("wanda"), SparsityPattern.parse("2:4"), 0.5)  # doctest: +SKIP
>>> engine.run(model, calibration_ids, batch_size=8).overall_sparsity  # doctest: +SKIP
0.5
"""

from .capture import BlockInputs, capture_block_inputs, run_block
from .devices import (
    block_on_device,
    check_device_available,
    execution_device,
    readable_weight,
    write_weight,
)
from .layerwise import DENSE_CACHE_BYTES, BlockResult, EngineResult, LayerwiseEngine
from .pipelines import PIPELINES, Pipeline, StructuredPipeline, infer_pipeline, register_pipeline
from .planning import (
    BlockPlan,
    PruningPlan,
    PruningTarget,
    TargetSparsity,
    check_pattern_fits,
    group_targets,
    plan_targets,
    select_targets,
)
from .statistics import (
    STATISTICS,
    DenseInputCache,
    DenseSource,
    LinearStatistics,
    Reads,
    Statistic,
    StatisticsCollector,
    register_statistic,
)
from .protocol import MethodProtocol
from .structured import BlockPass, InputMoments, StructuredSession, run_structured

__all__ = [
    "DENSE_CACHE_BYTES", "PIPELINES", "STATISTICS", "BlockInputs", "BlockPlan", "BlockResult", "DenseInputCache",
    "DenseSource", "EngineResult", "LayerwiseEngine", "LinearStatistics", "MethodProtocol", "Pipeline", "PruningPlan",
    "PruningTarget",
    "Reads", "Statistic", "StatisticsCollector", "StructuredPipeline", "StructuredSession", "BlockPass", "InputMoments",
    "run_structured", "TargetSparsity", "block_on_device", "capture_block_inputs",
    "check_device_available", "check_pattern_fits", "execution_device", "group_targets", "infer_pipeline",
    "plan_targets", "readable_weight", "register_pipeline", "register_statistic", "run_block", "select_targets",
    "write_weight",
]
