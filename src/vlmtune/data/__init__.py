"""The data layer: schemas, image references, validation, inlining. Knows nothing of models.

Training and ``vlmtune data validate`` both read datasets through ``iter_dataset`` /
``load_dataset``, so what validation accepts is exactly what training trains on.
"""

from vlmtune.data.errors import ImageError, RowError
from vlmtune.data.fetch import FetchError, FetchPolicy, fetch_image
from vlmtune.data.images import DEFAULT_MAX_PIXELS, ImageInfo, decode_image, probe_image
from vlmtune.data.inline import InlineReport, inline_dataset
from vlmtune.data.report import ValidationReport
from vlmtune.data.rows import parse_messages
from vlmtune.data.schema import (
    ImagePart,
    Message,
    Part,
    PreferenceRow,
    RLRow,
    Role,
    Row,
    RowKind,
    SFTRow,
    TextPart,
    ToolCall,
)
from vlmtune.data.validate import iter_dataset, load_dataset, validate_dataset

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "FetchError",
    "FetchPolicy",
    "ImageError",
    "ImageInfo",
    "ImagePart",
    "InlineReport",
    "Message",
    "Part",
    "PreferenceRow",
    "RLRow",
    "Role",
    "Row",
    "RowError",
    "RowKind",
    "SFTRow",
    "TextPart",
    "ToolCall",
    "ValidationReport",
    "decode_image",
    "fetch_image",
    "inline_dataset",
    "iter_dataset",
    "load_dataset",
    "parse_messages",
    "probe_image",
    "validate_dataset",
]
