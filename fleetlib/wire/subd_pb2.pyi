from fleetlib.wire import imageserver_pb2 as _imageserver_pb2
from fleetlib.wire import tree_pb2 as _tree_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ChangeKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHANGE_UNSPECIFIED: _ClassVar[ChangeKind]
    ADD: _ClassVar[ChangeKind]
    REPLACE: _ClassVar[ChangeKind]
    METADATA: _ClassVar[ChangeKind]
    DELETE: _ClassVar[ChangeKind]
CHANGE_UNSPECIFIED: ChangeKind
ADD: ChangeKind
REPLACE: ChangeKind
METADATA: ChangeKind
DELETE: ChangeKind

class Fence(_message.Message):
    __slots__ = ("owner", "token")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    owner: str
    token: int
    def __init__(self, owner: _Optional[str] = ..., token: _Optional[int] = ...) -> None: ...

class PollRequest(_message.Message):
    __slots__ = ("have_generation", "short")
    HAVE_GENERATION_FIELD_NUMBER: _ClassVar[int]
    SHORT_FIELD_NUMBER: _ClassVar[int]
    have_generation: int
    short: bool
    def __init__(self, have_generation: _Optional[int] = ..., short: _Optional[bool] = ...) -> None: ...

class FetchStatus(_message.Message):
    __slots__ = ("in_progress", "objects_total", "objects_done", "bytes_total", "bytes_done", "bytes_copied_locally", "error", "bytes_by_server")
    class BytesByServerEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    IN_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    OBJECTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    OBJECTS_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_COPIED_LOCALLY_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    BYTES_BY_SERVER_FIELD_NUMBER: _ClassVar[int]
    in_progress: bool
    objects_total: int
    objects_done: int
    bytes_total: int
    bytes_done: int
    bytes_copied_locally: int
    error: str
    bytes_by_server: _containers.ScalarMap[str, int]
    def __init__(self, in_progress: _Optional[bool] = ..., objects_total: _Optional[int] = ..., objects_done: _Optional[int] = ..., bytes_total: _Optional[int] = ..., bytes_done: _Optional[int] = ..., bytes_copied_locally: _Optional[int] = ..., error: _Optional[str] = ..., bytes_by_server: _Optional[_Mapping[str, int]] = ...) -> None: ...

class UpdateResult(_message.Message):
    __slots__ = ("in_progress", "image_name", "success", "error", "finished_unix", "change_window_ns", "paths_changed", "triggers_run", "warnings")
    IN_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_NAME_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    FINISHED_UNIX_FIELD_NUMBER: _ClassVar[int]
    CHANGE_WINDOW_NS_FIELD_NUMBER: _ClassVar[int]
    PATHS_CHANGED_FIELD_NUMBER: _ClassVar[int]
    TRIGGERS_RUN_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    in_progress: bool
    image_name: str
    success: bool
    error: str
    finished_unix: int
    change_window_ns: int
    paths_changed: int
    triggers_run: _containers.RepeatedScalarFieldContainer[str]
    warnings: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, in_progress: _Optional[bool] = ..., image_name: _Optional[str] = ..., success: _Optional[bool] = ..., error: _Optional[str] = ..., finished_unix: _Optional[int] = ..., change_window_ns: _Optional[int] = ..., paths_changed: _Optional[int] = ..., triggers_run: _Optional[_Iterable[str]] = ..., warnings: _Optional[_Iterable[str]] = ...) -> None: ...

class SubStatus(_message.Message):
    __slots__ = ("generation", "fingerprint", "scan_count", "last_scan_ns", "last_scan_unix", "free_bytes", "fetch", "last_update", "last_successful_image", "cached_objects", "inodes", "is_root", "scan_exclusions", "start_error", "scan_error", "pinned_objects", "fence", "fence_error")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SCAN_COUNT_FIELD_NUMBER: _ClassVar[int]
    LAST_SCAN_NS_FIELD_NUMBER: _ClassVar[int]
    LAST_SCAN_UNIX_FIELD_NUMBER: _ClassVar[int]
    FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    FETCH_FIELD_NUMBER: _ClassVar[int]
    LAST_UPDATE_FIELD_NUMBER: _ClassVar[int]
    LAST_SUCCESSFUL_IMAGE_FIELD_NUMBER: _ClassVar[int]
    CACHED_OBJECTS_FIELD_NUMBER: _ClassVar[int]
    INODES_FIELD_NUMBER: _ClassVar[int]
    IS_ROOT_FIELD_NUMBER: _ClassVar[int]
    SCAN_EXCLUSIONS_FIELD_NUMBER: _ClassVar[int]
    START_ERROR_FIELD_NUMBER: _ClassVar[int]
    SCAN_ERROR_FIELD_NUMBER: _ClassVar[int]
    PINNED_OBJECTS_FIELD_NUMBER: _ClassVar[int]
    FENCE_FIELD_NUMBER: _ClassVar[int]
    FENCE_ERROR_FIELD_NUMBER: _ClassVar[int]
    generation: int
    fingerprint: bytes
    scan_count: int
    last_scan_ns: int
    last_scan_unix: int
    free_bytes: int
    fetch: FetchStatus
    last_update: UpdateResult
    last_successful_image: str
    cached_objects: int
    inodes: int
    is_root: bool
    scan_exclusions: _containers.RepeatedScalarFieldContainer[str]
    start_error: str
    scan_error: str
    pinned_objects: int
    fence: Fence
    fence_error: str
    def __init__(self, generation: _Optional[int] = ..., fingerprint: _Optional[bytes] = ..., scan_count: _Optional[int] = ..., last_scan_ns: _Optional[int] = ..., last_scan_unix: _Optional[int] = ..., free_bytes: _Optional[int] = ..., fetch: _Optional[_Union[FetchStatus, _Mapping]] = ..., last_update: _Optional[_Union[UpdateResult, _Mapping]] = ..., last_successful_image: _Optional[str] = ..., cached_objects: _Optional[int] = ..., inodes: _Optional[int] = ..., is_root: _Optional[bool] = ..., scan_exclusions: _Optional[_Iterable[str]] = ..., start_error: _Optional[str] = ..., scan_error: _Optional[str] = ..., pinned_objects: _Optional[int] = ..., fence: _Optional[_Union[Fence, _Mapping]] = ..., fence_error: _Optional[str] = ...) -> None: ...

class PollResponse(_message.Message):
    __slots__ = ("status", "tree_follows", "tree_chunk", "tree_bytes")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    TREE_FOLLOWS_FIELD_NUMBER: _ClassVar[int]
    TREE_CHUNK_FIELD_NUMBER: _ClassVar[int]
    TREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    status: SubStatus
    tree_follows: bool
    tree_chunk: _tree_pb2.Chunk
    tree_bytes: int
    def __init__(self, status: _Optional[_Union[SubStatus, _Mapping]] = ..., tree_follows: _Optional[bool] = ..., tree_chunk: _Optional[_Union[_tree_pb2.Chunk, _Mapping]] = ..., tree_bytes: _Optional[int] = ...) -> None: ...

class FetchRequest(_message.Message):
    __slots__ = ("server", "hashes", "servers", "image_name", "fence")
    SERVER_FIELD_NUMBER: _ClassVar[int]
    HASHES_FIELD_NUMBER: _ClassVar[int]
    SERVERS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_NAME_FIELD_NUMBER: _ClassVar[int]
    FENCE_FIELD_NUMBER: _ClassVar[int]
    server: str
    hashes: _containers.RepeatedScalarFieldContainer[bytes]
    servers: _containers.RepeatedScalarFieldContainer[str]
    image_name: str
    fence: Fence
    def __init__(self, server: _Optional[str] = ..., hashes: _Optional[_Iterable[bytes]] = ..., servers: _Optional[_Iterable[str]] = ..., image_name: _Optional[str] = ..., fence: _Optional[_Union[Fence, _Mapping]] = ...) -> None: ...

class FetchResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Change(_message.Message):
    __slots__ = ("path", "kind", "inode", "link_to")
    PATH_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    INODE_FIELD_NUMBER: _ClassVar[int]
    LINK_TO_FIELD_NUMBER: _ClassVar[int]
    path: bytes
    kind: ChangeKind
    inode: _tree_pb2.Inode
    link_to: bytes
    def __init__(self, path: _Optional[bytes] = ..., kind: _Optional[_Union[ChangeKind, str]] = ..., inode: _Optional[_Union[_tree_pb2.Inode, _Mapping]] = ..., link_to: _Optional[bytes] = ...) -> None: ...

class UpdateRequest(_message.Message):
    __slots__ = ("image_name", "changes", "filter", "triggers", "old_triggers", "disable_safety_check", "disruption_permitted", "inline_objects", "servers", "fence")
    IMAGE_NAME_FIELD_NUMBER: _ClassVar[int]
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    TRIGGERS_FIELD_NUMBER: _ClassVar[int]
    OLD_TRIGGERS_FIELD_NUMBER: _ClassVar[int]
    DISABLE_SAFETY_CHECK_FIELD_NUMBER: _ClassVar[int]
    DISRUPTION_PERMITTED_FIELD_NUMBER: _ClassVar[int]
    INLINE_OBJECTS_FIELD_NUMBER: _ClassVar[int]
    SERVERS_FIELD_NUMBER: _ClassVar[int]
    FENCE_FIELD_NUMBER: _ClassVar[int]
    image_name: str
    changes: _containers.RepeatedCompositeFieldContainer[Change]
    filter: _imageserver_pb2.Filter
    triggers: _containers.RepeatedCompositeFieldContainer[_imageserver_pb2.Trigger]
    old_triggers: _containers.RepeatedCompositeFieldContainer[_imageserver_pb2.Trigger]
    disable_safety_check: bool
    disruption_permitted: bool
    inline_objects: _containers.RepeatedScalarFieldContainer[bytes]
    servers: _containers.RepeatedScalarFieldContainer[str]
    fence: Fence
    def __init__(self, image_name: _Optional[str] = ..., changes: _Optional[_Iterable[_Union[Change, _Mapping]]] = ..., filter: _Optional[_Union[_imageserver_pb2.Filter, _Mapping]] = ..., triggers: _Optional[_Iterable[_Union[_imageserver_pb2.Trigger, _Mapping]]] = ..., old_triggers: _Optional[_Iterable[_Union[_imageserver_pb2.Trigger, _Mapping]]] = ..., disable_safety_check: _Optional[bool] = ..., disruption_permitted: _Optional[bool] = ..., inline_objects: _Optional[_Iterable[bytes]] = ..., servers: _Optional[_Iterable[str]] = ..., fence: _Optional[_Union[Fence, _Mapping]] = ...) -> None: ...

class UpdateResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CleanupRequest(_message.Message):
    __slots__ = ("hashes", "all_but_keep", "keep", "fence")
    HASHES_FIELD_NUMBER: _ClassVar[int]
    ALL_BUT_KEEP_FIELD_NUMBER: _ClassVar[int]
    KEEP_FIELD_NUMBER: _ClassVar[int]
    FENCE_FIELD_NUMBER: _ClassVar[int]
    hashes: _containers.RepeatedScalarFieldContainer[bytes]
    all_but_keep: bool
    keep: _containers.RepeatedScalarFieldContainer[bytes]
    fence: Fence
    def __init__(self, hashes: _Optional[_Iterable[bytes]] = ..., all_but_keep: _Optional[bool] = ..., keep: _Optional[_Iterable[bytes]] = ..., fence: _Optional[_Union[Fence, _Mapping]] = ...) -> None: ...

class CleanupResponse(_message.Message):
    __slots__ = ("removed", "kept_pinned")
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    KEPT_PINNED_FIELD_NUMBER: _ClassVar[int]
    removed: int
    kept_pinned: int
    def __init__(self, removed: _Optional[int] = ..., kept_pinned: _Optional[int] = ...) -> None: ...

class GetFilesRequest(_message.Message):
    __slots__ = ("paths",)
    PATHS_FIELD_NUMBER: _ClassVar[int]
    paths: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, paths: _Optional[_Iterable[bytes]] = ...) -> None: ...

class GetFilesResponse(_message.Message):
    __slots__ = ("path", "data", "missing", "last")
    PATH_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    path: bytes
    data: bytes
    missing: bool
    last: bool
    def __init__(self, path: _Optional[bytes] = ..., data: _Optional[bytes] = ..., missing: _Optional[bool] = ..., last: _Optional[bool] = ...) -> None: ...

class Configuration(_message.Message):
    __slots__ = ("scan_speed_percent", "cpu_percent", "network_speed_percent", "scan_exclusions", "verify_period_seconds", "for_seconds", "restore_unix", "restore_keys", "fence")
    SCAN_SPEED_PERCENT_FIELD_NUMBER: _ClassVar[int]
    CPU_PERCENT_FIELD_NUMBER: _ClassVar[int]
    NETWORK_SPEED_PERCENT_FIELD_NUMBER: _ClassVar[int]
    SCAN_EXCLUSIONS_FIELD_NUMBER: _ClassVar[int]
    VERIFY_PERIOD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FOR_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RESTORE_UNIX_FIELD_NUMBER: _ClassVar[int]
    RESTORE_KEYS_FIELD_NUMBER: _ClassVar[int]
    FENCE_FIELD_NUMBER: _ClassVar[int]
    scan_speed_percent: int
    cpu_percent: int
    network_speed_percent: int
    scan_exclusions: _containers.RepeatedScalarFieldContainer[str]
    verify_period_seconds: int
    for_seconds: int
    restore_unix: int
    restore_keys: _containers.RepeatedScalarFieldContainer[str]
    fence: Fence
    def __init__(self, scan_speed_percent: _Optional[int] = ..., cpu_percent: _Optional[int] = ..., network_speed_percent: _Optional[int] = ..., scan_exclusions: _Optional[_Iterable[str]] = ..., verify_period_seconds: _Optional[int] = ..., for_seconds: _Optional[int] = ..., restore_unix: _Optional[int] = ..., restore_keys: _Optional[_Iterable[str]] = ..., fence: _Optional[_Union[Fence, _Mapping]] = ...) -> None: ...

class GetConfigurationRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("have_generation", "heartbeat_seconds")
    HAVE_GENERATION_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    have_generation: int
    heartbeat_seconds: int
    def __init__(self, have_generation: _Optional[int] = ..., heartbeat_seconds: _Optional[int] = ...) -> None: ...

class WatchEvent(_message.Message):
    __slots__ = ("generation", "scan_count", "heartbeat", "fetch_in_progress", "update_in_progress", "last_update_finished_unix", "scan_error", "last_scan_unix")
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    SCAN_COUNT_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    FETCH_IN_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    UPDATE_IN_PROGRESS_FIELD_NUMBER: _ClassVar[int]
    LAST_UPDATE_FINISHED_UNIX_FIELD_NUMBER: _ClassVar[int]
    SCAN_ERROR_FIELD_NUMBER: _ClassVar[int]
    LAST_SCAN_UNIX_FIELD_NUMBER: _ClassVar[int]
    generation: int
    scan_count: int
    heartbeat: bool
    fetch_in_progress: bool
    update_in_progress: bool
    last_update_finished_unix: int
    scan_error: str
    last_scan_unix: int
    def __init__(self, generation: _Optional[int] = ..., scan_count: _Optional[int] = ..., heartbeat: _Optional[bool] = ..., fetch_in_progress: _Optional[bool] = ..., update_in_progress: _Optional[bool] = ..., last_update_finished_unix: _Optional[int] = ..., scan_error: _Optional[str] = ..., last_scan_unix: _Optional[int] = ...) -> None: ...
