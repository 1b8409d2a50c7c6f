from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobPhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_PHASE_UNSPECIFIED: _ClassVar[JobPhase]
    PENDING: _ClassVar[JobPhase]
    RUNNING: _ClassVar[JobPhase]
    RECOVERING: _ClassVar[JobPhase]
    SUCCEEDED: _ClassVar[JobPhase]
    FAILED: _ClassVar[JobPhase]
    CANCELLED: _ClassVar[JobPhase]

class NodeState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NODE_STATE_UNSPECIFIED: _ClassVar[NodeState]
    READY: _ClassVar[NodeState]
    NOT_READY: _ClassVar[NodeState]
    CORDONED: _ClassVar[NodeState]

class NodeCondition(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NODE_CONDITION_UNSPECIFIED: _ClassVar[NodeCondition]
    HEALTHY: _ClassVar[NodeCondition]
    DEGRADED: _ClassVar[NodeCondition]
    FAILED_CONDITION: _ClassVar[NodeCondition]
JOB_PHASE_UNSPECIFIED: JobPhase
PENDING: JobPhase
RUNNING: JobPhase
RECOVERING: JobPhase
SUCCEEDED: JobPhase
FAILED: JobPhase
CANCELLED: JobPhase
NODE_STATE_UNSPECIFIED: NodeState
READY: NodeState
NOT_READY: NodeState
CORDONED: NodeState
NODE_CONDITION_UNSPECIFIED: NodeCondition
HEALTHY: NodeCondition
DEGRADED: NodeCondition
FAILED_CONDITION: NodeCondition

class ModelSpec(_message.Message):
    __slots__ = ("arch", "layers", "d_model", "heads", "vocab_size", "seq_len", "dropout", "preset", "kv_heads", "ffn_dim", "rope_base", "norm_eps", "tie_embeddings", "init_from", "activation_checkpointing")
    ARCH_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    D_MODEL_FIELD_NUMBER: _ClassVar[int]
    HEADS_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    DROPOUT_FIELD_NUMBER: _ClassVar[int]
    PRESET_FIELD_NUMBER: _ClassVar[int]
    KV_HEADS_FIELD_NUMBER: _ClassVar[int]
    FFN_DIM_FIELD_NUMBER: _ClassVar[int]
    ROPE_BASE_FIELD_NUMBER: _ClassVar[int]
    NORM_EPS_FIELD_NUMBER: _ClassVar[int]
    TIE_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    INIT_FROM_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_CHECKPOINTING_FIELD_NUMBER: _ClassVar[int]
    arch: str
    layers: int
    d_model: int
    heads: int
    vocab_size: int
    seq_len: int
    dropout: float
    preset: str
    kv_heads: int
    ffn_dim: int
    rope_base: float
    norm_eps: float
    tie_embeddings: bool
    init_from: str
    activation_checkpointing: str
    def __init__(self, arch: _Optional[str] = ..., layers: _Optional[int] = ..., d_model: _Optional[int] = ..., heads: _Optional[int] = ..., vocab_size: _Optional[int] = ..., seq_len: _Optional[int] = ..., dropout: _Optional[float] = ..., preset: _Optional[str] = ..., kv_heads: _Optional[int] = ..., ffn_dim: _Optional[int] = ..., rope_base: _Optional[float] = ..., norm_eps: _Optional[float] = ..., tie_embeddings: _Optional[bool] = ..., init_from: _Optional[str] = ..., activation_checkpointing: _Optional[str] = ...) -> None: ...

class DataSpec(_message.Message):
    __slots__ = ("kind", "path", "dtype", "num_samples", "eval_path", "eval_every", "eval_batches")
    KIND_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    EVAL_PATH_FIELD_NUMBER: _ClassVar[int]
    EVAL_EVERY_FIELD_NUMBER: _ClassVar[int]
    EVAL_BATCHES_FIELD_NUMBER: _ClassVar[int]
    kind: str
    path: str
    dtype: str
    num_samples: int
    eval_path: str
    eval_every: int
    eval_batches: int
    def __init__(self, kind: _Optional[str] = ..., path: _Optional[str] = ..., dtype: _Optional[str] = ..., num_samples: _Optional[int] = ..., eval_path: _Optional[str] = ..., eval_every: _Optional[int] = ..., eval_batches: _Optional[int] = ...) -> None: ...

class OptimizerSpec(_message.Message):
    __slots__ = ("name", "lr", "min_lr", "warmup_steps", "weight_decay", "beta1", "beta2", "eps", "grad_clip")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    MIN_LR_FIELD_NUMBER: _ClassVar[int]
    WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    GRAD_CLIP_FIELD_NUMBER: _ClassVar[int]
    name: str
    lr: float
    min_lr: float
    warmup_steps: int
    weight_decay: float
    beta1: float
    beta2: float
    eps: float
    grad_clip: float
    def __init__(self, name: _Optional[str] = ..., lr: _Optional[float] = ..., min_lr: _Optional[float] = ..., warmup_steps: _Optional[int] = ..., weight_decay: _Optional[float] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., eps: _Optional[float] = ..., grad_clip: _Optional[float] = ...) -> None: ...

class Parallelism(_message.Message):
    __slots__ = ("dp", "pp", "zero_stage")
    DP_FIELD_NUMBER: _ClassVar[int]
    PP_FIELD_NUMBER: _ClassVar[int]
    ZERO_STAGE_FIELD_NUMBER: _ClassVar[int]
    dp: int
    pp: int
    zero_stage: int
    def __init__(self, dp: _Optional[int] = ..., pp: _Optional[int] = ..., zero_stage: _Optional[int] = ...) -> None: ...

class ElasticSpec(_message.Message):
    __slots__ = ("min_workers", "max_workers", "snapshot_every", "checkpoint_every", "straggler_policy", "checkpoint_keep")
    MIN_WORKERS_FIELD_NUMBER: _ClassVar[int]
    MAX_WORKERS_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_EVERY_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_EVERY_FIELD_NUMBER: _ClassVar[int]
    STRAGGLER_POLICY_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_KEEP_FIELD_NUMBER: _ClassVar[int]
    min_workers: int
    max_workers: int
    snapshot_every: str
    checkpoint_every: int
    straggler_policy: str
    checkpoint_keep: int
    def __init__(self, min_workers: _Optional[int] = ..., max_workers: _Optional[int] = ..., snapshot_every: _Optional[str] = ..., checkpoint_every: _Optional[int] = ..., straggler_policy: _Optional[str] = ..., checkpoint_keep: _Optional[int] = ...) -> None: ...

class Resources(_message.Message):
    __slots__ = ("workers", "device", "host_memory_gb")
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    HOST_MEMORY_GB_FIELD_NUMBER: _ClassVar[int]
    workers: int
    device: str
    host_memory_gb: float
    def __init__(self, workers: _Optional[int] = ..., device: _Optional[str] = ..., host_memory_gb: _Optional[float] = ...) -> None: ...

class JobSpec(_message.Message):
    __slots__ = ("name", "model", "data", "optimizer", "seed", "steps", "global_batch_size", "micro_batch_size", "parallelism", "elastic", "resources")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    PARALLELISM_FIELD_NUMBER: _ClassVar[int]
    ELASTIC_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    name: str
    model: ModelSpec
    data: DataSpec
    optimizer: OptimizerSpec
    seed: int
    steps: int
    global_batch_size: int
    micro_batch_size: int
    parallelism: Parallelism
    elastic: ElasticSpec
    resources: Resources
    def __init__(self, name: _Optional[str] = ..., model: _Optional[_Union[ModelSpec, _Mapping]] = ..., data: _Optional[_Union[DataSpec, _Mapping]] = ..., optimizer: _Optional[_Union[OptimizerSpec, _Mapping]] = ..., seed: _Optional[int] = ..., steps: _Optional[int] = ..., global_batch_size: _Optional[int] = ..., micro_batch_size: _Optional[int] = ..., parallelism: _Optional[_Union[Parallelism, _Mapping]] = ..., elastic: _Optional[_Union[ElasticSpec, _Mapping]] = ..., resources: _Optional[_Union[Resources, _Mapping]] = ...) -> None: ...

class Layout(_message.Message):
    __slots__ = ("dp", "pp", "zero_stage")
    DP_FIELD_NUMBER: _ClassVar[int]
    PP_FIELD_NUMBER: _ClassVar[int]
    ZERO_STAGE_FIELD_NUMBER: _ClassVar[int]
    dp: int
    pp: int
    zero_stage: int
    def __init__(self, dp: _Optional[int] = ..., pp: _Optional[int] = ..., zero_stage: _Optional[int] = ...) -> None: ...

class WorkerAssignment(_message.Message):
    __slots__ = ("rank", "node", "slot", "dp_rank", "pp_rank")
    RANK_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    DP_RANK_FIELD_NUMBER: _ClassVar[int]
    PP_RANK_FIELD_NUMBER: _ClassVar[int]
    rank: int
    node: str
    slot: int
    dp_rank: int
    pp_rank: int
    def __init__(self, rank: _Optional[int] = ..., node: _Optional[str] = ..., slot: _Optional[int] = ..., dp_rank: _Optional[int] = ..., pp_rank: _Optional[int] = ...) -> None: ...

class Plan(_message.Message):
    __slots__ = ("job_id", "generation", "workers", "layout", "layer_partition", "sample_shares", "store_address", "store_prefix", "switch_at_step", "reason")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    LAYER_PARTITION_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_SHARES_FIELD_NUMBER: _ClassVar[int]
    STORE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STORE_PREFIX_FIELD_NUMBER: _ClassVar[int]
    SWITCH_AT_STEP_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    generation: int
    workers: _containers.RepeatedCompositeFieldContainer[WorkerAssignment]
    layout: Layout
    layer_partition: _containers.RepeatedScalarFieldContainer[int]
    sample_shares: _containers.RepeatedScalarFieldContainer[int]
    store_address: str
    store_prefix: str
    switch_at_step: int
    reason: str
    def __init__(self, job_id: _Optional[str] = ..., generation: _Optional[int] = ..., workers: _Optional[_Iterable[_Union[WorkerAssignment, _Mapping]]] = ..., layout: _Optional[_Union[Layout, _Mapping]] = ..., layer_partition: _Optional[_Iterable[int]] = ..., sample_shares: _Optional[_Iterable[int]] = ..., store_address: _Optional[str] = ..., store_prefix: _Optional[str] = ..., switch_at_step: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("rank", "node", "slot", "pid", "state", "exit_code", "signal")
    RANK_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    rank: int
    node: str
    slot: int
    pid: int
    state: str
    exit_code: int
    signal: str
    def __init__(self, rank: _Optional[int] = ..., node: _Optional[str] = ..., slot: _Optional[int] = ..., pid: _Optional[int] = ..., state: _Optional[str] = ..., exit_code: _Optional[int] = ..., signal: _Optional[str] = ...) -> None: ...

class Recovery(_message.Message):
    __slots__ = ("cause", "generation", "old_layout", "new_layout", "at_step", "detection_s", "plan_s", "rebuild_s", "transfer_s", "total_s", "steps_lost", "bytes_moved", "from_disk", "time", "bytes_local", "worker_total_s", "prepare_s", "comm_error")
    CAUSE_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    OLD_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    NEW_LAYOUT_FIELD_NUMBER: _ClassVar[int]
    AT_STEP_FIELD_NUMBER: _ClassVar[int]
    DETECTION_S_FIELD_NUMBER: _ClassVar[int]
    PLAN_S_FIELD_NUMBER: _ClassVar[int]
    REBUILD_S_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_S_FIELD_NUMBER: _ClassVar[int]
    TOTAL_S_FIELD_NUMBER: _ClassVar[int]
    STEPS_LOST_FIELD_NUMBER: _ClassVar[int]
    BYTES_MOVED_FIELD_NUMBER: _ClassVar[int]
    FROM_DISK_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    BYTES_LOCAL_FIELD_NUMBER: _ClassVar[int]
    WORKER_TOTAL_S_FIELD_NUMBER: _ClassVar[int]
    PREPARE_S_FIELD_NUMBER: _ClassVar[int]
    COMM_ERROR_FIELD_NUMBER: _ClassVar[int]
    cause: str
    generation: int
    old_layout: Layout
    new_layout: Layout
    at_step: int
    detection_s: float
    plan_s: float
    rebuild_s: float
    transfer_s: float
    total_s: float
    steps_lost: int
    bytes_moved: int
    from_disk: bool
    time: float
    bytes_local: int
    worker_total_s: float
    prepare_s: float
    comm_error: str
    def __init__(self, cause: _Optional[str] = ..., generation: _Optional[int] = ..., old_layout: _Optional[_Union[Layout, _Mapping]] = ..., new_layout: _Optional[_Union[Layout, _Mapping]] = ..., at_step: _Optional[int] = ..., detection_s: _Optional[float] = ..., plan_s: _Optional[float] = ..., rebuild_s: _Optional[float] = ..., transfer_s: _Optional[float] = ..., total_s: _Optional[float] = ..., steps_lost: _Optional[int] = ..., bytes_moved: _Optional[int] = ..., from_disk: _Optional[bool] = ..., time: _Optional[float] = ..., bytes_local: _Optional[int] = ..., worker_total_s: _Optional[float] = ..., prepare_s: _Optional[float] = ..., comm_error: _Optional[str] = ...) -> None: ...

class JobStatus(_message.Message):
    __slots__ = ("phase", "message", "step", "loss", "tokens_per_s", "generation", "layout", "workers", "recoveries", "recoverable_step", "created", "updated", "eta_s", "redundancy", "next_failure_cost", "goodput")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    RECOVERIES_FIELD_NUMBER: _ClassVar[int]
    RECOVERABLE_STEP_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    ETA_S_FIELD_NUMBER: _ClassVar[int]
    REDUNDANCY_FIELD_NUMBER: _ClassVar[int]
    NEXT_FAILURE_COST_FIELD_NUMBER: _ClassVar[int]
    GOODPUT_FIELD_NUMBER: _ClassVar[int]
    phase: JobPhase
    message: str
    step: int
    loss: float
    tokens_per_s: float
    generation: int
    layout: Layout
    workers: _containers.RepeatedCompositeFieldContainer[WorkerStatus]
    recoveries: _containers.RepeatedCompositeFieldContainer[Recovery]
    recoverable_step: int
    created: float
    updated: float
    eta_s: float
    redundancy: str
    next_failure_cost: str
    goodput: Goodput
    def __init__(self, phase: _Optional[_Union[JobPhase, str]] = ..., message: _Optional[str] = ..., step: _Optional[int] = ..., loss: _Optional[float] = ..., tokens_per_s: _Optional[float] = ..., generation: _Optional[int] = ..., layout: _Optional[_Union[Layout, _Mapping]] = ..., workers: _Optional[_Iterable[_Union[WorkerStatus, _Mapping]]] = ..., recoveries: _Optional[_Iterable[_Union[Recovery, _Mapping]]] = ..., recoverable_step: _Optional[int] = ..., created: _Optional[float] = ..., updated: _Optional[float] = ..., eta_s: _Optional[float] = ..., redundancy: _Optional[str] = ..., next_failure_cost: _Optional[str] = ..., goodput: _Optional[_Union[Goodput, _Mapping]] = ...) -> None: ...

class Goodput(_message.Message):
    __slots__ = ("ratio", "wall_s", "productive_s", "pending_s", "recovery_s", "replayed_s", "stall_s")
    RATIO_FIELD_NUMBER: _ClassVar[int]
    WALL_S_FIELD_NUMBER: _ClassVar[int]
    PRODUCTIVE_S_FIELD_NUMBER: _ClassVar[int]
    PENDING_S_FIELD_NUMBER: _ClassVar[int]
    RECOVERY_S_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_S_FIELD_NUMBER: _ClassVar[int]
    STALL_S_FIELD_NUMBER: _ClassVar[int]
    ratio: float
    wall_s: float
    productive_s: float
    pending_s: float
    recovery_s: float
    replayed_s: float
    stall_s: float
    def __init__(self, ratio: _Optional[float] = ..., wall_s: _Optional[float] = ..., productive_s: _Optional[float] = ..., pending_s: _Optional[float] = ..., recovery_s: _Optional[float] = ..., replayed_s: _Optional[float] = ..., stall_s: _Optional[float] = ...) -> None: ...

class JobEventEntry(_message.Message):
    __slots__ = ("time", "kind", "step", "generation", "message", "action", "data_json")
    TIME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    DATA_JSON_FIELD_NUMBER: _ClassVar[int]
    time: float
    kind: str
    step: int
    generation: int
    message: str
    action: str
    data_json: str
    def __init__(self, time: _Optional[float] = ..., kind: _Optional[str] = ..., step: _Optional[int] = ..., generation: _Optional[int] = ..., message: _Optional[str] = ..., action: _Optional[str] = ..., data_json: _Optional[str] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "spec", "status")
    ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    id: str
    spec: JobSpec
    status: JobStatus
    def __init__(self, id: _Optional[str] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ..., status: _Optional[_Union[JobStatus, _Mapping]] = ...) -> None: ...

class StepMetrics(_message.Message):
    __slots__ = ("step", "loss", "generation", "time", "step_time_s", "tokens_per_s", "eval_loss", "eval_perplexity")
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    STEP_TIME_S_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    EVAL_PERPLEXITY_FIELD_NUMBER: _ClassVar[int]
    step: int
    loss: float
    generation: int
    time: float
    step_time_s: float
    tokens_per_s: float
    eval_loss: float
    eval_perplexity: float
    def __init__(self, step: _Optional[int] = ..., loss: _Optional[float] = ..., generation: _Optional[int] = ..., time: _Optional[float] = ..., step_time_s: _Optional[float] = ..., tokens_per_s: _Optional[float] = ..., eval_loss: _Optional[float] = ..., eval_perplexity: _Optional[float] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("job_id", "time", "phase", "plan", "recovery", "progress", "entry")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    RECOVERY_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    time: float
    phase: JobPhase
    plan: Plan
    recovery: Recovery
    progress: StepMetrics
    entry: JobEventEntry
    def __init__(self, job_id: _Optional[str] = ..., time: _Optional[float] = ..., phase: _Optional[_Union[JobPhase, str]] = ..., plan: _Optional[_Union[Plan, _Mapping]] = ..., recovery: _Optional[_Union[Recovery, _Mapping]] = ..., progress: _Optional[_Union[StepMetrics, _Mapping]] = ..., entry: _Optional[_Union[JobEventEntry, _Mapping]] = ...) -> None: ...

class GpuHealth(_message.Message):
    __slots__ = ("index", "name", "utilization", "memory_used", "memory_total", "temperature_c", "power_w", "sm_clock_mhz", "throttle_reasons", "ecc_volatile_dbe", "retired_pages", "xid_events", "remapped_rows_pending", "remapped_rows_failed", "pcie_replay_errors", "nvlink_errors", "xid_total")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    UTILIZATION_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_C_FIELD_NUMBER: _ClassVar[int]
    POWER_W_FIELD_NUMBER: _ClassVar[int]
    SM_CLOCK_MHZ_FIELD_NUMBER: _ClassVar[int]
    THROTTLE_REASONS_FIELD_NUMBER: _ClassVar[int]
    ECC_VOLATILE_DBE_FIELD_NUMBER: _ClassVar[int]
    RETIRED_PAGES_FIELD_NUMBER: _ClassVar[int]
    XID_EVENTS_FIELD_NUMBER: _ClassVar[int]
    REMAPPED_ROWS_PENDING_FIELD_NUMBER: _ClassVar[int]
    REMAPPED_ROWS_FAILED_FIELD_NUMBER: _ClassVar[int]
    PCIE_REPLAY_ERRORS_FIELD_NUMBER: _ClassVar[int]
    NVLINK_ERRORS_FIELD_NUMBER: _ClassVar[int]
    XID_TOTAL_FIELD_NUMBER: _ClassVar[int]
    index: int
    name: str
    utilization: float
    memory_used: int
    memory_total: int
    temperature_c: float
    power_w: float
    sm_clock_mhz: float
    throttle_reasons: _containers.RepeatedScalarFieldContainer[str]
    ecc_volatile_dbe: int
    retired_pages: int
    xid_events: _containers.RepeatedScalarFieldContainer[int]
    remapped_rows_pending: int
    remapped_rows_failed: int
    pcie_replay_errors: int
    nvlink_errors: int
    xid_total: int
    def __init__(self, index: _Optional[int] = ..., name: _Optional[str] = ..., utilization: _Optional[float] = ..., memory_used: _Optional[int] = ..., memory_total: _Optional[int] = ..., temperature_c: _Optional[float] = ..., power_w: _Optional[float] = ..., sm_clock_mhz: _Optional[float] = ..., throttle_reasons: _Optional[_Iterable[str]] = ..., ecc_volatile_dbe: _Optional[int] = ..., retired_pages: _Optional[int] = ..., xid_events: _Optional[_Iterable[int]] = ..., remapped_rows_pending: _Optional[int] = ..., remapped_rows_failed: _Optional[int] = ..., pcie_replay_errors: _Optional[int] = ..., nvlink_errors: _Optional[int] = ..., xid_total: _Optional[int] = ...) -> None: ...

class NodeHealth(_message.Message):
    __slots__ = ("cpu_percent", "memory_used", "memory_total", "gpus", "time")
    CPU_PERCENT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    cpu_percent: float
    memory_used: int
    memory_total: int
    gpus: _containers.RepeatedCompositeFieldContainer[GpuHealth]
    time: float
    def __init__(self, cpu_percent: _Optional[float] = ..., memory_used: _Optional[int] = ..., memory_total: _Optional[int] = ..., gpus: _Optional[_Iterable[_Union[GpuHealth, _Mapping]]] = ..., time: _Optional[float] = ...) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("id", "hostname", "address", "slots", "used_slots", "state", "condition", "condition_reason", "health", "labels", "store_address", "slot_devices")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    USED_SLOTS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CONDITION_FIELD_NUMBER: _ClassVar[int]
    CONDITION_REASON_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    STORE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SLOT_DEVICES_FIELD_NUMBER: _ClassVar[int]
    id: str
    hostname: str
    address: str
    slots: int
    used_slots: int
    state: NodeState
    condition: NodeCondition
    condition_reason: str
    health: NodeHealth
    labels: _containers.ScalarMap[str, str]
    store_address: str
    slot_devices: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., hostname: _Optional[str] = ..., address: _Optional[str] = ..., slots: _Optional[int] = ..., used_slots: _Optional[int] = ..., state: _Optional[_Union[NodeState, str]] = ..., condition: _Optional[_Union[NodeCondition, str]] = ..., condition_reason: _Optional[str] = ..., health: _Optional[_Union[NodeHealth, _Mapping]] = ..., labels: _Optional[_Mapping[str, str]] = ..., store_address: _Optional[str] = ..., slot_devices: _Optional[_Iterable[str]] = ...) -> None: ...

class SubmitJobRequest(_message.Message):
    __slots__ = ("spec", "request_id")
    SPEC_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    spec: JobSpec
    request_id: str
    def __init__(self, spec: _Optional[_Union[JobSpec, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("phases", "page_size", "page_token")
    PHASES_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    phases: _containers.RepeatedScalarFieldContainer[JobPhase]
    page_size: int
    page_token: str
    def __init__(self, phases: _Optional[_Iterable[_Union[JobPhase, str]]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetJobMetricsRequest(_message.Message):
    __slots__ = ("job_id", "since_step")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SINCE_STEP_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    since_step: int
    def __init__(self, job_id: _Optional[str] = ..., since_step: _Optional[int] = ...) -> None: ...

class GetJobMetricsResponse(_message.Message):
    __slots__ = ("steps",)
    STEPS_FIELD_NUMBER: _ClassVar[int]
    steps: _containers.RepeatedCompositeFieldContainer[StepMetrics]
    def __init__(self, steps: _Optional[_Iterable[_Union[StepMetrics, _Mapping]]] = ...) -> None: ...

class ListJobEventsRequest(_message.Message):
    __slots__ = ("job_id", "limit", "since_time")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    SINCE_TIME_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    limit: int
    since_time: float
    def __init__(self, job_id: _Optional[str] = ..., limit: _Optional[int] = ..., since_time: _Optional[float] = ...) -> None: ...

class ListJobEventsResponse(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[JobEventEntry]
    def __init__(self, events: _Optional[_Iterable[_Union[JobEventEntry, _Mapping]]] = ...) -> None: ...

class ListNodesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListNodesResponse(_message.Message):
    __slots__ = ("nodes",)
    NODES_FIELD_NUMBER: _ClassVar[int]
    nodes: _containers.RepeatedCompositeFieldContainer[NodeInfo]
    def __init__(self, nodes: _Optional[_Iterable[_Union[NodeInfo, _Mapping]]] = ...) -> None: ...

class NodeRequest(_message.Message):
    __slots__ = ("node_id",)
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    def __init__(self, node_id: _Optional[str] = ...) -> None: ...

class AuditRecord(_message.Message):
    __slots__ = ("time", "identity", "role", "via", "method", "target", "code", "detail", "peer", "count")
    TIME_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    VIA_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    time: float
    identity: str
    role: str
    via: str
    method: str
    target: str
    code: str
    detail: str
    peer: str
    count: int
    def __init__(self, time: _Optional[float] = ..., identity: _Optional[str] = ..., role: _Optional[str] = ..., via: _Optional[str] = ..., method: _Optional[str] = ..., target: _Optional[str] = ..., code: _Optional[str] = ..., detail: _Optional[str] = ..., peer: _Optional[str] = ..., count: _Optional[int] = ...) -> None: ...

class ListAuditRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class ListAuditResponse(_message.Message):
    __slots__ = ("records",)
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[AuditRecord]
    def __init__(self, records: _Optional[_Iterable[_Union[AuditRecord, _Mapping]]] = ...) -> None: ...

class ChaosRequest(_message.Message):
    __slots__ = ("action", "job_id", "rank", "factor", "node_id")
    ACTION_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    FACTOR_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    action: str
    job_id: str
    rank: int
    factor: float
    node_id: str
    def __init__(self, action: _Optional[str] = ..., job_id: _Optional[str] = ..., rank: _Optional[int] = ..., factor: _Optional[float] = ..., node_id: _Optional[str] = ...) -> None: ...

class ChaosResponse(_message.Message):
    __slots__ = ("id", "node_id", "message")
    ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    id: str
    node_id: str
    message: str
    def __init__(self, id: _Optional[str] = ..., node_id: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...
