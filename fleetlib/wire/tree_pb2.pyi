from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InodeKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INODE_KIND_UNSPECIFIED: _ClassVar[InodeKind]
    DIRECTORY: _ClassVar[InodeKind]
    REGULAR: _ClassVar[InodeKind]
    SYMLINK: _ClassVar[InodeKind]
    CHAR_DEVICE: _ClassVar[InodeKind]
    BLOCK_DEVICE: _ClassVar[InodeKind]
    FIFO: _ClassVar[InodeKind]
INODE_KIND_UNSPECIFIED: InodeKind
DIRECTORY: InodeKind
REGULAR: InodeKind
SYMLINK: InodeKind
CHAR_DEVICE: InodeKind
BLOCK_DEVICE: InodeKind
FIFO: InodeKind

class Xattr(_message.Message):
    __slots__ = ("name", "value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    name: bytes
    value: bytes
    def __init__(self, name: _Optional[bytes] = ..., value: _Optional[bytes] = ...) -> None: ...

class Inode(_message.Message):
    __slots__ = ("number", "kind", "mode", "uid", "gid", "mtime_ns", "size", "hash", "symlink_target", "rdev", "xattrs")
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    UID_FIELD_NUMBER: _ClassVar[int]
    GID_FIELD_NUMBER: _ClassVar[int]
    MTIME_NS_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    SYMLINK_TARGET_FIELD_NUMBER: _ClassVar[int]
    RDEV_FIELD_NUMBER: _ClassVar[int]
    XATTRS_FIELD_NUMBER: _ClassVar[int]
    number: int
    kind: InodeKind
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    size: int
    hash: bytes
    symlink_target: bytes
    rdev: int
    xattrs: _containers.RepeatedCompositeFieldContainer[Xattr]
    def __init__(self, number: _Optional[int] = ..., kind: _Optional[_Union[InodeKind, str]] = ..., mode: _Optional[int] = ..., uid: _Optional[int] = ..., gid: _Optional[int] = ..., mtime_ns: _Optional[int] = ..., size: _Optional[int] = ..., hash: _Optional[bytes] = ..., symlink_target: _Optional[bytes] = ..., rdev: _Optional[int] = ..., xattrs: _Optional[_Iterable[_Union[Xattr, _Mapping]]] = ...) -> None: ...

class DirEntry(_message.Message):
    __slots__ = ("name", "inode")
    NAME_FIELD_NUMBER: _ClassVar[int]
    INODE_FIELD_NUMBER: _ClassVar[int]
    name: bytes
    inode: int
    def __init__(self, name: _Optional[bytes] = ..., inode: _Optional[int] = ...) -> None: ...

class Directory(_message.Message):
    __slots__ = ("inode", "entries")
    INODE_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    inode: int
    entries: _containers.RepeatedCompositeFieldContainer[DirEntry]
    def __init__(self, inode: _Optional[int] = ..., entries: _Optional[_Iterable[_Union[DirEntry, _Mapping]]] = ...) -> None: ...

class Tree(_message.Message):
    __slots__ = ("root", "inodes", "directories")
    ROOT_FIELD_NUMBER: _ClassVar[int]
    INODES_FIELD_NUMBER: _ClassVar[int]
    DIRECTORIES_FIELD_NUMBER: _ClassVar[int]
    root: int
    inodes: _containers.RepeatedCompositeFieldContainer[Inode]
    directories: _containers.RepeatedCompositeFieldContainer[Directory]
    def __init__(self, root: _Optional[int] = ..., inodes: _Optional[_Iterable[_Union[Inode, _Mapping]]] = ..., directories: _Optional[_Iterable[_Union[Directory, _Mapping]]] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...
