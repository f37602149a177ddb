"""The node's shared-memory status board: one segment per node that the supervisor creates and its
children (cluster, loader, validator) attach to, each writing only its own section, everyone reading
consistent copies through a seqlock.

This package owns the segments (``shm``), the byte layout (``layout``), the seqlock (Cython with a
plain-Python twin, chosen in ``seqlock``) and the ``Board`` API. It must not interpret the values it
carries (the supervisor and the HTTP API do) nor hold the weight arena's contents (only its segment
naming and lifetime helpers are shared).
"""

from butterfly.board.board import Board, BoardSnapshot
from butterfly.board.errors import BoardAttachError, BoardError, TornSectionError
from butterfly.board.layout import (
    BOARD_SIZE,
    LAYOUT_VERSION,
    ClusterSection,
    EngineSection,
    HeaderSection,
    LoaderSection,
    NodeSection,
    Section,
    ValidatorSection,
)
from butterfly.board.seqlock import IMPLEMENTATION
from butterfly.board.shm import (
    Segment,
    attach_segment,
    create_segment,
    open_segment_count,
    remove_stale_segments,
    segment_name,
    unlink_segment,
)

__all__ = [
    "BOARD_SIZE",
    "IMPLEMENTATION",
    "LAYOUT_VERSION",
    "Board",
    "BoardAttachError",
    "BoardError",
    "BoardSnapshot",
    "ClusterSection",
    "HeaderSection",
    "LoaderSection",
    "NodeSection",
    "Section",
    "Segment",
    "TornSectionError",
    "ValidatorSection",
    "EngineSection",
    "attach_segment",
    "create_segment",
    "open_segment_count",
    "remove_stale_segments",
    "segment_name",
    "unlink_segment",
]
