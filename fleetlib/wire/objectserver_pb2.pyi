from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Compression(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMPRESSION_NONE: _ClassVar[Compression]
    COMPRESSION_ZSTD: _ClassVar[Compression]
COMPRESSION_NONE: Compression
COMPRESSION_ZSTD: Compression

class ObjectChunk(_message.Message):
    __slots__ = ("hash", "size", "data", "compression", "packed_length")
    HASH_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    PACKED_LENGTH_FIELD_NUMBER: _ClassVar[int]
    hash: bytes
    size: int
    data: bytes
    compression: Compression
    packed_length: int
    def __init__(self, hash: _Optional[bytes] = ..., size: _Optional[int] = ..., data: _Optional[bytes] = ..., compression: _Optional[_Union[Compression, str]] = ..., packed_length: _Optional[int] = ...) -> None: ...

class ObjectChunks(_message.Message):
    __slots__ = ("chunks", "packed")
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    PACKED_FIELD_NUMBER: _ClassVar[int]
    chunks: _containers.RepeatedCompositeFieldContainer[ObjectChunk]
    packed: bytes
    def __init__(self, chunks: _Optional[_Iterable[_Union[ObjectChunk, _Mapping]]] = ..., packed: _Optional[bytes] = ...) -> None: ...

class AddObjectsResponse(_message.Message):
    __slots__ = ("added", "already_present", "bytes_added")
    ADDED_FIELD_NUMBER: _ClassVar[int]
    ALREADY_PRESENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_ADDED_FIELD_NUMBER: _ClassVar[int]
    added: int
    already_present: int
    bytes_added: int
    def __init__(self, added: _Optional[int] = ..., already_present: _Optional[int] = ..., bytes_added: _Optional[int] = ...) -> None: ...

class CheckObjectsRequest(_message.Message):
    __slots__ = ("hashes",)
    HASHES_FIELD_NUMBER: _ClassVar[int]
    hashes: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, hashes: _Optional[_Iterable[bytes]] = ...) -> None: ...

class CheckObjectsResponse(_message.Message):
    __slots__ = ("present", "sizes")
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    SIZES_FIELD_NUMBER: _ClassVar[int]
    present: _containers.RepeatedScalarFieldContainer[bool]
    sizes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, present: _Optional[_Iterable[bool]] = ..., sizes: _Optional[_Iterable[int]] = ...) -> None: ...

class GetObjectsRequest(_message.Message):
    __slots__ = ("hashes", "compress", "pack")
    HASHES_FIELD_NUMBER: _ClassVar[int]
    COMPRESS_FIELD_NUMBER: _ClassVar[int]
    PACK_FIELD_NUMBER: _ClassVar[int]
    hashes: _containers.RepeatedScalarFieldContainer[bytes]
    compress: bool
    pack: bool
    def __init__(self, hashes: _Optional[_Iterable[bytes]] = ..., compress: _Optional[bool] = ..., pack: _Optional[bool] = ...) -> None: ...
