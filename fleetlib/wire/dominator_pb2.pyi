from fleetlib.wire import audit_pb2 as _audit_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HostRequest(_message.Message):
    __slots__ = ("hostname",)
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    hostname: str
    def __init__(self, hostname: _Optional[str] = ...) -> None: ...

class SubInfo(_message.Message):
    __slots__ = ("hostname", "address", "status", "required_image", "planned_image", "current_image", "last_poll_unix", "last_sync_unix", "last_scan_unix", "last_error", "intrusion_paths", "intrusion_unix", "change_window_ns", "updates_disabled", "safety_cleared", "history", "outdated_paths", "kept_paths", "tags", "disruption_allowed", "history_entries", "pause", "owner")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_IMAGE_FIELD_NUMBER: _ClassVar[int]
    PLANNED_IMAGE_FIELD_NUMBER: _ClassVar[int]
    CURRENT_IMAGE_FIELD_NUMBER: _ClassVar[int]
    LAST_POLL_UNIX_FIELD_NUMBER: _ClassVar[int]
    LAST_SYNC_UNIX_FIELD_NUMBER: _ClassVar[int]
    LAST_SCAN_UNIX_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    INTRUSION_PATHS_FIELD_NUMBER: _ClassVar[int]
    INTRUSION_UNIX_FIELD_NUMBER: _ClassVar[int]
    CHANGE_WINDOW_NS_FIELD_NUMBER: _ClassVar[int]
    UPDATES_DISABLED_FIELD_NUMBER: _ClassVar[int]
    SAFETY_CLEARED_FIELD_NUMBER: _ClassVar[int]
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    OUTDATED_PATHS_FIELD_NUMBER: _ClassVar[int]
    KEPT_PATHS_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    DISRUPTION_ALLOWED_FIELD_NUMBER: _ClassVar[int]
    HISTORY_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    PAUSE_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    hostname: str
    address: str
    status: str
    required_image: str
    planned_image: str
    current_image: str
    last_poll_unix: int
    last_sync_unix: int
    last_scan_unix: int
    last_error: str
    intrusion_paths: _containers.RepeatedScalarFieldContainer[str]
    intrusion_unix: int
    change_window_ns: int
    updates_disabled: bool
    safety_cleared: bool
    history: _containers.RepeatedScalarFieldContainer[str]
    outdated_paths: _containers.RepeatedScalarFieldContainer[str]
    kept_paths: _containers.RepeatedScalarFieldContainer[str]
    tags: _containers.ScalarMap[str, str]
    disruption_allowed: bool
    history_entries: _containers.RepeatedCompositeFieldContainer[HistoryEntry]
    pause: HostPause
    owner: str
    def __init__(self, hostname: _Optional[str] = ..., address: _Optional[str] = ..., status: _Optional[str] = ..., required_image: _Optional[str] = ..., planned_image: _Optional[str] = ..., current_image: _Optional[str] = ..., last_poll_unix: _Optional[int] = ..., last_sync_unix: _Optional[int] = ..., last_scan_unix: _Optional[int] = ..., last_error: _Optional[str] = ..., intrusion_paths: _Optional[_Iterable[str]] = ..., intrusion_unix: _Optional[int] = ..., change_window_ns: _Optional[int] = ..., updates_disabled: _Optional[bool] = ..., safety_cleared: _Optional[bool] = ..., history: _Optional[_Iterable[str]] = ..., outdated_paths: _Optional[_Iterable[str]] = ..., kept_paths: _Optional[_Iterable[str]] = ..., tags: _Optional[_Mapping[str, str]] = ..., disruption_allowed: _Optional[bool] = ..., history_entries: _Optional[_Iterable[_Union[HistoryEntry, _Mapping]]] = ..., pause: _Optional[_Union[HostPause, _Mapping]] = ..., owner: _Optional[str] = ...) -> None: ...

class HistoryEntry(_message.Message):
    __slots__ = ("time_unix", "status", "message")
    TIME_UNIX_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    time_unix: int
    status: str
    message: str
    def __init__(self, time_unix: _Optional[int] = ..., status: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class HostPause(_message.Message):
    __slots__ = ("by", "reason", "since_unix", "until_unix")
    BY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SINCE_UNIX_FIELD_NUMBER: _ClassVar[int]
    UNTIL_UNIX_FIELD_NUMBER: _ClassVar[int]
    by: str
    reason: str
    since_unix: int
    until_unix: int
    def __init__(self, by: _Optional[str] = ..., reason: _Optional[str] = ..., since_unix: _Optional[int] = ..., until_unix: _Optional[int] = ...) -> None: ...

class ListSubsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListSubsResponse(_message.Message):
    __slots__ = ("subs",)
    SUBS_FIELD_NUMBER: _ClassVar[int]
    subs: _containers.RepeatedCompositeFieldContainer[SubInfo]
    def __init__(self, subs: _Optional[_Iterable[_Union[SubInfo, _Mapping]]] = ...) -> None: ...

class FleetStatus(_message.Message):
    __slots__ = ("updates_disabled", "disabled_by", "disabled_reason", "disabled_unix", "hosts_by_status", "hosts", "diff_cache_hits", "diff_cache_misses", "mdb_error", "disabled_until_unix")
    class HostsByStatusEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    UPDATES_DISABLED_FIELD_NUMBER: _ClassVar[int]
    DISABLED_BY_FIELD_NUMBER: _ClassVar[int]
    DISABLED_REASON_FIELD_NUMBER: _ClassVar[int]
    DISABLED_UNIX_FIELD_NUMBER: _ClassVar[int]
    HOSTS_BY_STATUS_FIELD_NUMBER: _ClassVar[int]
    HOSTS_FIELD_NUMBER: _ClassVar[int]
    DIFF_CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    DIFF_CACHE_MISSES_FIELD_NUMBER: _ClassVar[int]
    MDB_ERROR_FIELD_NUMBER: _ClassVar[int]
    DISABLED_UNTIL_UNIX_FIELD_NUMBER: _ClassVar[int]
    updates_disabled: bool
    disabled_by: str
    disabled_reason: str
    disabled_unix: int
    hosts_by_status: _containers.ScalarMap[str, int]
    hosts: int
    diff_cache_hits: int
    diff_cache_misses: int
    mdb_error: str
    disabled_until_unix: int
    def __init__(self, updates_disabled: _Optional[bool] = ..., disabled_by: _Optional[str] = ..., disabled_reason: _Optional[str] = ..., disabled_unix: _Optional[int] = ..., hosts_by_status: _Optional[_Mapping[str, int]] = ..., hosts: _Optional[int] = ..., diff_cache_hits: _Optional[int] = ..., diff_cache_misses: _Optional[int] = ..., mdb_error: _Optional[str] = ..., disabled_until_unix: _Optional[int] = ...) -> None: ...

class GetFleetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DisableUpdatesRequest(_message.Message):
    __slots__ = ("reason", "expires_in_seconds")
    REASON_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    reason: str
    expires_in_seconds: int
    def __init__(self, reason: _Optional[str] = ..., expires_in_seconds: _Optional[int] = ...) -> None: ...

class EnableUpdatesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FastUpdateProgress(_message.Message):
    __slots__ = ("status", "message", "done", "success")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_FIELD_NUMBER: _ClassVar[int]
    status: str
    message: str
    done: bool
    success: bool
    def __init__(self, status: _Optional[str] = ..., message: _Optional[str] = ..., done: _Optional[bool] = ..., success: _Optional[bool] = ...) -> None: ...

class MachinesJson(_message.Message):
    __slots__ = ("json", "pauses")
    class PausesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: HostPause
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[HostPause, _Mapping]] = ...) -> None: ...
    JSON_FIELD_NUMBER: _ClassVar[int]
    PAUSES_FIELD_NUMBER: _ClassVar[int]
    json: str
    pauses: _containers.MessageMap[str, HostPause]
    def __init__(self, json: _Optional[str] = ..., pauses: _Optional[_Mapping[str, HostPause]] = ...) -> None: ...

class SetMachineRequest(_message.Message):
    __slots__ = ("hostname", "patch_json", "force", "pause", "resume")
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    PATCH_JSON_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    PAUSE_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    hostname: str
    patch_json: str
    force: bool
    pause: PauseSpec
    resume: bool
    def __init__(self, hostname: _Optional[str] = ..., patch_json: _Optional[str] = ..., force: _Optional[bool] = ..., pause: _Optional[_Union[PauseSpec, _Mapping]] = ..., resume: _Optional[bool] = ...) -> None: ...

class ImportMachinesRequest(_message.Message):
    __slots__ = ("json", "replace", "force")
    JSON_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    json: str
    replace: bool
    force: bool
    def __init__(self, json: _Optional[str] = ..., replace: _Optional[bool] = ..., force: _Optional[bool] = ...) -> None: ...

class ImportMachinesResponse(_message.Message):
    __slots__ = ("added", "changed", "removed")
    ADDED_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    added: int
    changed: int
    removed: int
    def __init__(self, added: _Optional[int] = ..., changed: _Optional[int] = ..., removed: _Optional[int] = ...) -> None: ...

class ListMachinesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TokenInfo(_message.Message):
    __slots__ = ("name", "scope", "created_unix", "created_by", "last_used_unix", "revoked_unix", "revoked_by")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_UNIX_FIELD_NUMBER: _ClassVar[int]
    REVOKED_UNIX_FIELD_NUMBER: _ClassVar[int]
    REVOKED_BY_FIELD_NUMBER: _ClassVar[int]
    name: str
    scope: str
    created_unix: int
    created_by: str
    last_used_unix: int
    revoked_unix: int
    revoked_by: str
    def __init__(self, name: _Optional[str] = ..., scope: _Optional[str] = ..., created_unix: _Optional[int] = ..., created_by: _Optional[str] = ..., last_used_unix: _Optional[int] = ..., revoked_unix: _Optional[int] = ..., revoked_by: _Optional[str] = ...) -> None: ...

class CreateTokenRequest(_message.Message):
    __slots__ = ("name", "scope")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    scope: str
    def __init__(self, name: _Optional[str] = ..., scope: _Optional[str] = ...) -> None: ...

class CreateTokenResponse(_message.Message):
    __slots__ = ("token", "value")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    token: TokenInfo
    value: str
    def __init__(self, token: _Optional[_Union[TokenInfo, _Mapping]] = ..., value: _Optional[str] = ...) -> None: ...

class ListTokensRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTokensResponse(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[TokenInfo]
    def __init__(self, tokens: _Optional[_Iterable[_Union[TokenInfo, _Mapping]]] = ...) -> None: ...

class RevokeTokenRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class PauseSpec(_message.Message):
    __slots__ = ("reason", "expires_in_seconds")
    REASON_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    reason: str
    expires_in_seconds: int
    def __init__(self, reason: _Optional[str] = ..., expires_in_seconds: _Optional[int] = ...) -> None: ...

class ListDominatorsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DominatorInfo(_message.Message):
    __slots__ = ("name", "address", "shards", "lease_age_seconds", "renewal_age_seconds", "started_unix", "last_renewal_unix", "answering")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    LEASE_AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RENEWAL_AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_FIELD_NUMBER: _ClassVar[int]
    LAST_RENEWAL_UNIX_FIELD_NUMBER: _ClassVar[int]
    ANSWERING_FIELD_NUMBER: _ClassVar[int]
    name: str
    address: str
    shards: int
    lease_age_seconds: float
    renewal_age_seconds: float
    started_unix: int
    last_renewal_unix: int
    answering: bool
    def __init__(self, name: _Optional[str] = ..., address: _Optional[str] = ..., shards: _Optional[int] = ..., lease_age_seconds: _Optional[float] = ..., renewal_age_seconds: _Optional[float] = ..., started_unix: _Optional[int] = ..., last_renewal_unix: _Optional[int] = ..., answering: _Optional[bool] = ...) -> None: ...

class ListDominatorsResponse(_message.Message):
    __slots__ = ("dominators", "shards", "lease_seconds")
    DOMINATORS_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    dominators: _containers.RepeatedCompositeFieldContainer[DominatorInfo]
    shards: int
    lease_seconds: float
    def __init__(self, dominators: _Optional[_Iterable[_Union[DominatorInfo, _Mapping]]] = ..., shards: _Optional[int] = ..., lease_seconds: _Optional[float] = ...) -> None: ...
