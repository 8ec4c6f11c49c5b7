from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetStatusRequest(_message.Message):
    __slots__ = ("include_history",)
    INCLUDE_HISTORY_FIELD_NUMBER: _ClassVar[int]
    include_history: bool
    def __init__(self, include_history: _Optional[bool] = ...) -> None: ...

class ConfigSummary(_message.Message):
    __slots__ = ("sizes", "classes", "update_rule", "n_fetch", "n_push", "staleness_bound", "sync", "pretrain_epochs", "finetune_epochs", "train_samples", "n_servers", "n_workers", "config_json", "n_params")
    SIZES_FIELD_NUMBER: _ClassVar[int]
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    UPDATE_RULE_FIELD_NUMBER: _ClassVar[int]
    N_FETCH_FIELD_NUMBER: _ClassVar[int]
    N_PUSH_FIELD_NUMBER: _ClassVar[int]
    STALENESS_BOUND_FIELD_NUMBER: _ClassVar[int]
    SYNC_FIELD_NUMBER: _ClassVar[int]
    PRETRAIN_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    FINETUNE_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    N_SERVERS_FIELD_NUMBER: _ClassVar[int]
    N_WORKERS_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    N_PARAMS_FIELD_NUMBER: _ClassVar[int]
    sizes: _containers.RepeatedScalarFieldContainer[int]
    classes: int
    update_rule: str
    n_fetch: int
    n_push: int
    staleness_bound: int
    sync: bool
    pretrain_epochs: float
    finetune_epochs: float
    train_samples: int
    n_servers: int
    n_workers: int
    config_json: str
    n_params: int
    def __init__(self, sizes: _Optional[_Iterable[int]] = ..., classes: _Optional[int] = ..., update_rule: _Optional[str] = ..., n_fetch: _Optional[int] = ..., n_push: _Optional[int] = ..., staleness_bound: _Optional[int] = ..., sync: _Optional[bool] = ..., pretrain_epochs: _Optional[float] = ..., finetune_epochs: _Optional[float] = ..., train_samples: _Optional[int] = ..., n_servers: _Optional[int] = ..., n_workers: _Optional[int] = ..., config_json: _Optional[str] = ..., n_params: _Optional[int] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("phase", "phase_index", "n_phases", "epoch", "phase_epochs", "fraction", "samples_in_phase", "phase_samples")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    PHASE_INDEX_FIELD_NUMBER: _ClassVar[int]
    N_PHASES_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    PHASE_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_IN_PHASE_FIELD_NUMBER: _ClassVar[int]
    PHASE_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    phase: str
    phase_index: int
    n_phases: int
    epoch: float
    phase_epochs: float
    fraction: float
    samples_in_phase: int
    phase_samples: int
    def __init__(self, phase: _Optional[str] = ..., phase_index: _Optional[int] = ..., n_phases: _Optional[int] = ..., epoch: _Optional[float] = ..., phase_epochs: _Optional[float] = ..., fraction: _Optional[float] = ..., samples_in_phase: _Optional[int] = ..., phase_samples: _Optional[int] = ...) -> None: ...

class Staleness(_message.Message):
    __slots__ = ("mean", "max", "count", "sum", "bucket_upper_bounds", "counts")
    MEAN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    SUM_FIELD_NUMBER: _ClassVar[int]
    BUCKET_UPPER_BOUNDS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    mean: float
    max: int
    count: int
    sum: int
    bucket_upper_bounds: _containers.RepeatedScalarFieldContainer[int]
    counts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, mean: _Optional[float] = ..., max: _Optional[int] = ..., count: _Optional[int] = ..., sum: _Optional[int] = ..., bucket_upper_bounds: _Optional[_Iterable[int]] = ..., counts: _Optional[_Iterable[int]] = ...) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("worker", "rank", "state", "alive", "steps", "samples", "samples_per_second", "heartbeat_age_seconds", "loss", "pushes", "pulls", "updates_applied", "updates_rejected")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ALIVE_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    PUSHES_FIELD_NUMBER: _ClassVar[int]
    PULLS_FIELD_NUMBER: _ClassVar[int]
    UPDATES_APPLIED_FIELD_NUMBER: _ClassVar[int]
    UPDATES_REJECTED_FIELD_NUMBER: _ClassVar[int]
    worker: int
    rank: int
    state: str
    alive: bool
    steps: int
    samples: int
    samples_per_second: float
    heartbeat_age_seconds: float
    loss: float
    pushes: int
    pulls: int
    updates_applied: int
    updates_rejected: int
    def __init__(self, worker: _Optional[int] = ..., rank: _Optional[int] = ..., state: _Optional[str] = ..., alive: _Optional[bool] = ..., steps: _Optional[int] = ..., samples: _Optional[int] = ..., samples_per_second: _Optional[float] = ..., heartbeat_age_seconds: _Optional[float] = ..., loss: _Optional[float] = ..., pushes: _Optional[int] = ..., pulls: _Optional[int] = ..., updates_applied: _Optional[int] = ..., updates_rejected: _Optional[int] = ...) -> None: ...

class Status(_message.Message):
    __slots__ = ("job_id", "ready", "stopping", "config", "phase", "progress", "version", "updates_applied", "updates_rejected", "bytes_received", "staleness", "workers", "has_loss", "loss", "has_test_accuracy", "test_accuracy", "samples_per_second", "uptime_seconds", "checkpoints", "metrics_address", "history_json", "restarts", "resumed_from", "eval_split", "has_eval_accuracy", "eval_accuracy")
    class UpdatesRejectedEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    STOPPING_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    UPDATES_APPLIED_FIELD_NUMBER: _ClassVar[int]
    UPDATES_REJECTED_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    HAS_LOSS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    HAS_TEST_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    TEST_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    UPTIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    METRICS_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    HISTORY_JSON_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FROM_FIELD_NUMBER: _ClassVar[int]
    EVAL_SPLIT_FIELD_NUMBER: _ClassVar[int]
    HAS_EVAL_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    EVAL_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    ready: bool
    stopping: bool
    config: ConfigSummary
    phase: str
    progress: Progress
    version: int
    updates_applied: int
    updates_rejected: _containers.ScalarMap[str, int]
    bytes_received: int
    staleness: Staleness
    workers: _containers.RepeatedCompositeFieldContainer[WorkerStatus]
    has_loss: bool
    loss: float
    has_test_accuracy: bool
    test_accuracy: float
    samples_per_second: float
    uptime_seconds: float
    checkpoints: int
    metrics_address: str
    history_json: _containers.RepeatedScalarFieldContainer[str]
    restarts: int
    resumed_from: str
    eval_split: str
    has_eval_accuracy: bool
    eval_accuracy: float
    def __init__(self, job_id: _Optional[str] = ..., ready: _Optional[bool] = ..., stopping: _Optional[bool] = ..., config: _Optional[_Union[ConfigSummary, _Mapping]] = ..., phase: _Optional[str] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., version: _Optional[int] = ..., updates_applied: _Optional[int] = ..., updates_rejected: _Optional[_Mapping[str, int]] = ..., bytes_received: _Optional[int] = ..., staleness: _Optional[_Union[Staleness, _Mapping]] = ..., workers: _Optional[_Iterable[_Union[WorkerStatus, _Mapping]]] = ..., has_loss: _Optional[bool] = ..., loss: _Optional[float] = ..., has_test_accuracy: _Optional[bool] = ..., test_accuracy: _Optional[float] = ..., samples_per_second: _Optional[float] = ..., uptime_seconds: _Optional[float] = ..., checkpoints: _Optional[int] = ..., metrics_address: _Optional[str] = ..., history_json: _Optional[_Iterable[str]] = ..., restarts: _Optional[int] = ..., resumed_from: _Optional[str] = ..., eval_split: _Optional[str] = ..., has_eval_accuracy: _Optional[bool] = ..., eval_accuracy: _Optional[float] = ...) -> None: ...

class CheckpointRequest(_message.Message):
    __slots__ = ("note",)
    NOTE_FIELD_NUMBER: _ClassVar[int]
    note: str
    def __init__(self, note: _Optional[str] = ...) -> None: ...

class CheckpointInfo(_message.Message):
    __slots__ = ("path", "version", "phase", "size_bytes", "created_unix", "sha256")
    PATH_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    path: str
    version: int
    phase: str
    size_bytes: int
    created_unix: float
    sha256: str
    def __init__(self, path: _Optional[str] = ..., version: _Optional[int] = ..., phase: _Optional[str] = ..., size_bytes: _Optional[int] = ..., created_unix: _Optional[float] = ..., sha256: _Optional[str] = ...) -> None: ...

class CheckpointReply(_message.Message):
    __slots__ = ("checkpoint", "duration_seconds")
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    checkpoint: CheckpointInfo
    duration_seconds: float
    def __init__(self, checkpoint: _Optional[_Union[CheckpointInfo, _Mapping]] = ..., duration_seconds: _Optional[float] = ...) -> None: ...

class ListCheckpointsRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class ListCheckpointsReply(_message.Message):
    __slots__ = ("checkpoints",)
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    checkpoints: _containers.RepeatedCompositeFieldContainer[CheckpointInfo]
    def __init__(self, checkpoints: _Optional[_Iterable[_Union[CheckpointInfo, _Mapping]]] = ...) -> None: ...

class StopRequest(_message.Message):
    __slots__ = ("timeout_seconds", "wait")
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    timeout_seconds: float
    wait: bool
    def __init__(self, timeout_seconds: _Optional[float] = ..., wait: _Optional[bool] = ...) -> None: ...

class StopReply(_message.Message):
    __slots__ = ("stopping", "final_checkpoint")
    STOPPING_FIELD_NUMBER: _ClassVar[int]
    FINAL_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    stopping: bool
    final_checkpoint: CheckpointInfo
    def __init__(self, stopping: _Optional[bool] = ..., final_checkpoint: _Optional[_Union[CheckpointInfo, _Mapping]] = ...) -> None: ...
