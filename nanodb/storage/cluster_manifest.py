"""The folder of a sharded database: a small cluster manifest, `cluster.json`, and nothing per item.

    cluster.json    the model (as a store's manifest names it), the shards' folders in order, where
                    each lives (a shared folder any node can open, or a folder on one node's disk), and
                    the scanned roots

Each shard is an ordinary nanodb store folder (format.py) owned by one Ray actor. The manifest is
written once when the database is made and again only when its scanned roots or model weights move,
atomically (a temporary file, fsync, rename), so a coordinator killed at any moment leaves it whole.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from nanodb.storage.format import MANIFEST, DatabaseError, Manifest, fsync_dir

CLUSTER_MANIFEST = "cluster.json"
CLUSTER_FORMAT = 1


@dataclass
class ShardLocation:
    """Where one shard's store folder is: `node` is the IP address of the node whose disk holds it, or
    None when the folder is on storage every node can open (the shard may then run on any node)."""

    folder: str
    node: str | None = None


@dataclass
class ClusterManifest:
    model: Manifest  # the model fields of a store's manifest (count and files unused): every shard's model
    shards: list[ShardLocation]
    roots: dict[str, bool] = field(default_factory=dict)
    version: int = CLUSTER_FORMAT


def is_sharded(root: Path) -> bool:
    return (root / CLUSTER_MANIFEST).exists()


def read_cluster_manifest(root: Path) -> ClusterManifest:
    path = root / CLUSTER_MANIFEST
    try:
        data = json.loads(path.read_bytes())
        if data.get("version") != CLUSTER_FORMAT:
            raise DatabaseError(f"{path} has format version {data.get('version')!r}; this nanodb reads "
                                f"{CLUSTER_FORMAT}: upgrade nanodb")
        return ClusterManifest(Manifest(**data["model"]), [ShardLocation(**s) for s in data["shards"]],
                               dict(data.get("roots", {})))
    except OSError as e:
        raise DatabaseError(f"cannot read {path}: {e.strerror or e}") from None
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise DatabaseError(f"{path} is not a nanodb cluster manifest ({type(e).__name__}: {e})") from None


def write_cluster_manifest(root: Path, manifest: ClusterManifest) -> None:
    """Atomically replace the cluster manifest (made with its folder when new)."""
    if (root / MANIFEST).exists():
        raise DatabaseError(f"{root} is a local nanodb database: it cannot become a sharded one")
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / (CLUSTER_MANIFEST + ".tmp")
        with open(tmp, "w") as f:
            json.dump(asdict(manifest), f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, root / CLUSTER_MANIFEST)
        fsync_dir(root)
    except OSError as e:
        raise DatabaseError(f"cannot write {root / CLUSTER_MANIFEST}: {e.strerror or e}") from None
