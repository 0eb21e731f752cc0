"""Stage 1b: each sample's nearest neighbours in the teacher feature banks.

One job per module:

- `search`  the engine: exact / fast (bf16 + certified re-rank) / approximate top-k
- `table`   the build stage (`clip-ping neighbors`), the files on disk, the reader
- `queue`   the training-time queue variant (neighbours among recent samples)
- `show`    `clip-ping neighbors show`: the HTML page and label agreement

The public names are re-exported here, so ``from clip_ping.knn import X`` works.
"""

from .queue import NeighborQueue
from .search import (
    AUTO_EXACT_MAX_ROWS,
    METHODS,
    default_nlist,
    default_nprobe,
    default_nprobe_pq,
    resolve_method,
    search_neighbors,
    set_faiss_threads,
)
from .show import ShowConfig, label_agreement, show_neighbors, write_neighbor_page
from .table import (
    FORMAT_VERSION,
    NEIGHBOR_FILES,
    NEIGHBORS_JSON,
    NeighborsConfig,
    NeighborTable,
    bank_fingerprint,
    build_neighbors,
    load_neighbors,
)
from .tiled import TILE_PRECISIONS, bf16_matmul_is_fast

__all__ = [
    "AUTO_EXACT_MAX_ROWS", "FORMAT_VERSION", "METHODS", "TILE_PRECISIONS", "NEIGHBOR_FILES", "NEIGHBORS_JSON",
    "NeighborQueue", "NeighborTable", "NeighborsConfig", "ShowConfig",
    "bank_fingerprint", "bf16_matmul_is_fast", "build_neighbors", "default_nlist", "default_nprobe", "default_nprobe_pq",
    "label_agreement", "load_neighbors", "resolve_method", "search_neighbors", "set_faiss_threads",
    "show_neighbors", "write_neighbor_page",
]
