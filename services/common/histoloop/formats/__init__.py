"""histoloop.formats: the one owner of every artifact that crosses a service boundary.

A service never builds another service's key or parses another service's file by hand;
it imports the reader, writer or key function from here:

- :mod:`~histoloop.formats.positions` — Space Ranger positions (both CSV flavours, any
  column order) and scale factors;
- :mod:`~histoloop.formats.patches` — tiling's patch sets;
- :mod:`~histoloop.formats.embeddings` — embeddings keys and ``obsm`` names;
- :mod:`~histoloop.formats.labels` — consensus label snapshots;
- :mod:`~histoloop.formats.models` — the model registry's layout (module, card, warm start);
- :mod:`~histoloop.formats.querysets` — query-set records;
- :mod:`~histoloop.formats.vocab` — heads, resampling modes, consensus rules, feature sets
  and the loop's defaults.

Predictions and the embeddings AnnData are read and written by :mod:`histoloop.datasets`.
"""

from histoloop.formats import embeddings, labels, models, patches, positions, querysets, vocab

__all__ = ["embeddings", "labels", "models", "patches", "positions", "querysets", "vocab"]
