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
    __slots__ = ("images", "location")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[ImageSummary]
    location: str
    def __init__(self, images: _Optional[_Iterable[_Union[ImageSummary, _Mapping]]] = ..., location: _Optional[str] = ...) -> None: ...

class DeleteImageRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

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
