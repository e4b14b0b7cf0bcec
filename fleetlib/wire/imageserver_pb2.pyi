from fleetlib.wire import audit_pb2 as _audit_pb2
from fleetlib.wire import tree_pb2 as _tree_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Filter(_message.Message):
    __slots__ = ("lines",)
    LINES_FIELD_NUMBER: _ClassVar[int]
    lines: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, lines: _Optional[_Iterable[str]] = ...) -> None: ...

class Trigger(_message.Message):
    __slots__ = ("match_lines", "service", "do_reload", "do_reboot", "high_impact")
    MATCH_LINES_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    DO_RELOAD_FIELD_NUMBER: _ClassVar[int]
    DO_REBOOT_FIELD_NUMBER: _ClassVar[int]
    HIGH_IMPACT_FIELD_NUMBER: _ClassVar[int]
    match_lines: _containers.RepeatedScalarFieldContainer[str]
    service: str
    do_reload: bool
    do_reboot: bool
    high_impact: bool
    def __init__(self, match_lines: _Optional[_Iterable[str]] = ..., service: _Optional[str] = ..., do_reload: _Optional[bool] = ..., do_reboot: _Optional[bool] = ..., high_impact: _Optional[bool] = ...) -> None: ...

class ComputedFile(_message.Message):
    __slots__ = ("path", "source")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    path: str
    source: str
    def __init__(self, path: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...

class Signature(_message.Message):
    __slots__ = ("key_name", "public_key", "signature")
    KEY_NAME_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    key_name: str
    public_key: bytes
    signature: bytes
    def __init__(self, key_name: _Optional[str] = ..., public_key: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("name", "tree", "filter", "triggers", "computed_files", "created_unix", "expires_unix", "signature")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TREE_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    TRIGGERS_FIELD_NUMBER: _ClassVar[int]
    COMPUTED_FILES_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_UNIX_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    name: str
    tree: _tree_pb2.Tree
    filter: Filter
    triggers: _containers.RepeatedCompositeFieldContainer[Trigger]
    computed_files: _containers.RepeatedCompositeFieldContainer[ComputedFile]
    created_unix: int
    expires_unix: int
    signature: Signature
    def __init__(self, name: _Optional[str] = ..., tree: _Optional[_Union[_tree_pb2.Tree, _Mapping]] = ..., filter: _Optional[_Union[Filter, _Mapping]] = ..., triggers: _Optional[_Iterable[_Union[Trigger, _Mapping]]] = ..., computed_files: _Optional[_Iterable[_Union[ComputedFile, _Mapping]]] = ..., created_unix: _Optional[int] = ..., expires_unix: _Optional[int] = ..., signature: _Optional[_Union[Signature, _Mapping]] = ...) -> None: ...

class ImageSummary(_message.Message):
    __slots__ = ("name", "created_unix", "expires_unix", "inodes", "total_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_UNIX_FIELD_NUMBER: _ClassVar[int]
    INODES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    created_unix: int
    expires_unix: int
    inodes: int
    total_bytes: int
    def __init__(self, name: _Optional[str] = ..., created_unix: _Optional[int] = ..., expires_unix: _Optional[int] = ..., inodes: _Optional[int] = ..., total_bytes: _Optional[int] = ...) -> None: ...

class AddImageResponse(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetImageRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListImagesRequest(_message.Message):
    __slots__ = ("prefix",)
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    prefix: str
    def __init__(self, prefix: _Optional[str] = ...) -> None: ...

class ListImagesResponse(_message.Message):
    __slots__ = ("images", "location", "quarantined", "upstream")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    QUARANTINED_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[ImageSummary]
    location: str
    quarantined: _containers.RepeatedCompositeFieldContainer[QuarantinedImage]
    upstream: str
    def __init__(self, images: _Optional[_Iterable[_Union[ImageSummary, _Mapping]]] = ..., location: _Optional[str] = ..., quarantined: _Optional[_Iterable[_Union[QuarantinedImage, _Mapping]]] = ..., upstream: _Optional[str] = ...) -> None: ...

class QuarantinedImage(_message.Message):
    __slots__ = ("name", "local_digest", "upstream_digest", "since_unix")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LOCAL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_DIGEST_FIELD_NUMBER: _ClassVar[int]
    SINCE_UNIX_FIELD_NUMBER: _ClassVar[int]
    name: str
    local_digest: bytes
    upstream_digest: bytes
    since_unix: int
    def __init__(self, name: _Optional[str] = ..., local_digest: _Optional[bytes] = ..., upstream_digest: _Optional[bytes] = ..., since_unix: _Optional[int] = ...) -> None: ...

class DeleteImageRequest(_message.Message):
    __slots__ = ("name", "replica_only")
    NAME_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ONLY_FIELD_NUMBER: _ClassVar[int]
    name: str
    replica_only: bool
    def __init__(self, name: _Optional[str] = ..., replica_only: _Optional[bool] = ...) -> None: ...

class DeleteImageResponse(_message.Message):
    __slots__ = ("objects_freed", "bytes_freed")
    OBJECTS_FREED_FIELD_NUMBER: _ClassVar[int]
    BYTES_FREED_FIELD_NUMBER: _ClassVar[int]
    objects_freed: int
    bytes_freed: int
    def __init__(self, objects_freed: _Optional[int] = ..., bytes_freed: _Optional[int] = ...) -> None: ...

class CheckImageRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class CheckImageResponse(_message.Message):
    __slots__ = ("exists",)
    EXISTS_FIELD_NUMBER: _ClassVar[int]
    exists: bool
    def __init__(self, exists: _Optional[bool] = ...) -> None: ...

class WatchImagesRequest(_message.Message):
    __slots__ = ("include_existing",)
    INCLUDE_EXISTING_FIELD_NUMBER: _ClassVar[int]
    include_existing: bool
    def __init__(self, include_existing: _Optional[bool] = ...) -> None: ...

class ImageEvent(_message.Message):
    __slots__ = ("kind", "name")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[ImageEvent.Kind]
        ADDED: _ClassVar[ImageEvent.Kind]
        DELETED: _ClassVar[ImageEvent.Kind]
    KIND_UNSPECIFIED: ImageEvent.Kind
    ADDED: ImageEvent.Kind
    DELETED: ImageEvent.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    kind: ImageEvent.Kind
    name: str
    def __init__(self, kind: _Optional[_Union[ImageEvent.Kind, str]] = ..., name: _Optional[str] = ...) -> None: ...

class SetImageExpiryRequest(_message.Message):
    __slots__ = ("name", "expires_unix")
    NAME_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_UNIX_FIELD_NUMBER: _ClassVar[int]
    name: str
    expires_unix: int
    def __init__(self, name: _Optional[str] = ..., expires_unix: _Optional[int] = ...) -> None: ...

class SetImageExpiryResponse(_message.Message):
    __slots__ = ("image", "previous_expires_unix")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_EXPIRES_UNIX_FIELD_NUMBER: _ClassVar[int]
    image: ImageSummary
    previous_expires_unix: int
    def __init__(self, image: _Optional[_Union[ImageSummary, _Mapping]] = ..., previous_expires_unix: _Optional[int] = ...) -> None: ...

class ServerIdentity(_message.Message):
    __slots__ = ("id", "generation")
    ID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    id: str
    generation: int
    def __init__(self, id: _Optional[str] = ..., generation: _Optional[int] = ...) -> None: ...

class JournalEntry(_message.Message):
    __slots__ = ("name", "digest", "expires_unix", "deleted")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_UNIX_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    name: str
    digest: bytes
    expires_unix: int
    deleted: bool
    def __init__(self, name: _Optional[str] = ..., digest: _Optional[bytes] = ..., expires_unix: _Optional[int] = ..., deleted: _Optional[bool] = ...) -> None: ...

class JournalEvent(_message.Message):
    __slots__ = ("sequence", "kind", "entry")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[JournalEvent.Kind]
        ADDED: _ClassVar[JournalEvent.Kind]
        DELETED: _ClassVar[JournalEvent.Kind]
        EXPIRY_CHANGED: _ClassVar[JournalEvent.Kind]
    KIND_UNSPECIFIED: JournalEvent.Kind
    ADDED: JournalEvent.Kind
    DELETED: JournalEvent.Kind
    EXPIRY_CHANGED: JournalEvent.Kind
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ENTRY_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    kind: JournalEvent.Kind
    entry: JournalEntry
    def __init__(self, sequence: _Optional[int] = ..., kind: _Optional[_Union[JournalEvent.Kind, str]] = ..., entry: _Optional[_Union[JournalEntry, _Mapping]] = ...) -> None: ...

class ReplicaHello(_message.Message):
    __slots__ = ("identity", "address", "port", "location", "following_id", "following_generation", "from_sequence", "ancestry")
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    FOLLOWING_ID_FIELD_NUMBER: _ClassVar[int]
    FOLLOWING_GENERATION_FIELD_NUMBER: _ClassVar[int]
    FROM_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    ANCESTRY_FIELD_NUMBER: _ClassVar[int]
    identity: ServerIdentity
    address: str
    port: int
    location: str
    following_id: str
    following_generation: int
    from_sequence: int
    ancestry: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, identity: _Optional[_Union[ServerIdentity, _Mapping]] = ..., address: _Optional[str] = ..., port: _Optional[int] = ..., location: _Optional[str] = ..., following_id: _Optional[str] = ..., following_generation: _Optional[int] = ..., from_sequence: _Optional[int] = ..., ancestry: _Optional[_Iterable[str]] = ...) -> None: ...

class ReplicaProgress(_message.Message):
    __slots__ = ("applied_sequence", "bytes_replicated", "bytes_pending", "state", "quarantined")
    APPLIED_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    BYTES_REPLICATED_FIELD_NUMBER: _ClassVar[int]
    BYTES_PENDING_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    QUARANTINED_FIELD_NUMBER: _ClassVar[int]
    applied_sequence: int
    bytes_replicated: int
    bytes_pending: int
    state: str
    quarantined: int
    def __init__(self, applied_sequence: _Optional[int] = ..., bytes_replicated: _Optional[int] = ..., bytes_pending: _Optional[int] = ..., state: _Optional[str] = ..., quarantined: _Optional[int] = ...) -> None: ...

class ReplicateRequest(_message.Message):
    __slots__ = ("hello", "progress")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    hello: ReplicaHello
    progress: ReplicaProgress
    def __init__(self, hello: _Optional[_Union[ReplicaHello, _Mapping]] = ..., progress: _Optional[_Union[ReplicaProgress, _Mapping]] = ...) -> None: ...

class UpstreamHello(_message.Message):
    __slots__ = ("identity", "ancestry", "master_address", "sequence", "snapshot_follows")
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    ANCESTRY_FIELD_NUMBER: _ClassVar[int]
    MASTER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FOLLOWS_FIELD_NUMBER: _ClassVar[int]
    identity: ServerIdentity
    ancestry: _containers.RepeatedScalarFieldContainer[str]
    master_address: str
    sequence: int
    snapshot_follows: bool
    def __init__(self, identity: _Optional[_Union[ServerIdentity, _Mapping]] = ..., ancestry: _Optional[_Iterable[str]] = ..., master_address: _Optional[str] = ..., sequence: _Optional[int] = ..., snapshot_follows: _Optional[bool] = ...) -> None: ...

class JournalSnapshot(_message.Message):
    __slots__ = ("entries", "last", "sequence")
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[JournalEntry]
    last: bool
    sequence: int
    def __init__(self, entries: _Optional[_Iterable[_Union[JournalEntry, _Mapping]]] = ..., last: _Optional[bool] = ..., sequence: _Optional[int] = ...) -> None: ...

class ReplicateResponse(_message.Message):
    __slots__ = ("hello", "snapshot", "event")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    hello: UpstreamHello
    snapshot: JournalSnapshot
    event: JournalEvent
    def __init__(self, hello: _Optional[_Union[UpstreamHello, _Mapping]] = ..., snapshot: _Optional[_Union[JournalSnapshot, _Mapping]] = ..., event: _Optional[_Union[JournalEvent, _Mapping]] = ...) -> None: ...

class ListReplicasRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReplicaInfo(_message.Message):
    __slots__ = ("identity", "address", "location", "applied_sequence", "lag_events", "bytes_pending", "bytes_replicated", "state", "connected", "last_seen_unix")
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    APPLIED_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    LAG_EVENTS_FIELD_NUMBER: _ClassVar[int]
    BYTES_PENDING_FIELD_NUMBER: _ClassVar[int]
    BYTES_REPLICATED_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_UNIX_FIELD_NUMBER: _ClassVar[int]
    identity: ServerIdentity
    address: str
    location: str
    applied_sequence: int
    lag_events: int
    bytes_pending: int
    bytes_replicated: int
    state: str
    connected: bool
    last_seen_unix: int
    def __init__(self, identity: _Optional[_Union[ServerIdentity, _Mapping]] = ..., address: _Optional[str] = ..., location: _Optional[str] = ..., applied_sequence: _Optional[int] = ..., lag_events: _Optional[int] = ..., bytes_pending: _Optional[int] = ..., bytes_replicated: _Optional[int] = ..., state: _Optional[str] = ..., connected: _Optional[bool] = ..., last_seen_unix: _Optional[int] = ...) -> None: ...

class ListReplicasResponse(_message.Message):
    __slots__ = ("identity", "location", "sequence", "upstream", "replicas")
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    identity: ServerIdentity
    location: str
    sequence: int
    upstream: str
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaInfo]
    def __init__(self, identity: _Optional[_Union[ServerIdentity, _Mapping]] = ..., location: _Optional[str] = ..., sequence: _Optional[int] = ..., upstream: _Optional[str] = ..., replicas: _Optional[_Iterable[_Union[ReplicaInfo, _Mapping]]] = ...) -> None: ...
