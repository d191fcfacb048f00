from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_BFLOAT16: DType
DTYPE_FLOAT16: DType

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class StepSeq(_message.Message):
    __slots__ = ("block_table", "start", "n")
    BLOCK_TABLE_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    block_table: _containers.RepeatedScalarFieldContainer[int]
    start: int
    n: int
    def __init__(self, block_table: _Optional[_Iterable[int]] = ..., start: _Optional[int] = ..., n: _Optional[int] = ...) -> None: ...

class AttentionRequest(_message.Message):
    __slots__ = ("step", "layer", "seqs", "hidden")
    STEP_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    SEQS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    step: int
    layer: int
    seqs: _containers.RepeatedCompositeFieldContainer[StepSeq]
    hidden: Tensor
    def __init__(self, step: _Optional[int] = ..., layer: _Optional[int] = ..., seqs: _Optional[_Iterable[_Union[StepSeq, _Mapping]]] = ..., hidden: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class AttentionReply(_message.Message):
    __slots__ = ("hidden",)
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    hidden: Tensor
    def __init__(self, hidden: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ExpertBlock(_message.Message):
    __slots__ = ("expert", "rows")
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    expert: int
    rows: int
    def __init__(self, expert: _Optional[int] = ..., rows: _Optional[int] = ...) -> None: ...

class ExpertRequest(_message.Message):
    __slots__ = ("layer", "blocks", "rows")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    blocks: _containers.RepeatedCompositeFieldContainer[ExpertBlock]
    rows: Tensor
    def __init__(self, layer: _Optional[int] = ..., blocks: _Optional[_Iterable[_Union[ExpertBlock, _Mapping]]] = ..., rows: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ExpertReply(_message.Message):
    __slots__ = ("rows",)
    ROWS_FIELD_NUMBER: _ClassVar[int]
    rows: Tensor
    def __init__(self, rows: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class EchoMessage(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...
