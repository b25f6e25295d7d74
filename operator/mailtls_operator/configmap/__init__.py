"""The ConfigMaps ``<instance>-mailtls``: the readable, diff-able record of what is deployed.

Pure: builds the objects and reads the tables back.  A table is never refused
for its size (DESIGN.md §4); it takes one of three shapes, the smallest that fits
the 1 MiB object limit (measured as the JSON the API server receives):

1. **plain** (the usual case): ``data["tls_policy"]`` (and ``data["transport"]``)
   in the one ConfigMap ``<instance>-mailtls``, when the text is at most
   :data:`COMPRESS_ABOVE` bytes;
2. **compressed**: past that, ``binaryData["tls_policy.gz"]`` (gzip) in the same
   one ConfigMap, as long as it fits;
3. **split**: past that, the gzip bytes (the whole table gzipped once) are cut
   into chunks of :data:`CHUNK` bytes, ``binaryData["tls_policy.gz.000"]``,
   ``.001``, ... held by *part* ConfigMaps ``<instance>-mailtls-part-1`` ...
   ``-part-N`` (label ``mailtls.io/part: "N"``); the chunks follow each other in
   part order, one per part for tls_policy.  The primary ``<instance>-mailtls``
   then holds no chunk: only the manifest ``data["tls_policy.gz.chunks"]``::

       chunks: 4
       size: 2815642
       sha256: <hex sha256 of the whole gzip>
       chunk: 000 relay-mailtls-part-1
       ...

   and whatever plain table still fits (typically ``transport``).  The manifest is
   in ``data`` because a pod reads the mounted files, not the annotations; the
   primary also carries ``mailtls.io/parts`` (number of part ConfigMaps) and
   ``mailtls.io/tls-policy-sha256`` for readers of the API.  To load: concatenate
   the chunks in order, check the sha256, gunzip (:func:`reassemble` does exactly
   that; so does ``manifests/examples/postfix/load-tables.sh``).

Every object carries the revision annotation, so a reader can tell a
half-updated set.  Write the parts first and the primary last (the primary's
manifest is the commit point), then delete :func:`stale_parts`.  A reader that
sees a new primary with old parts (or the reverse) finds a sha256 mismatch and
retries; it never loads a mix.

gzip is written with mtime 0: the same table always gives the same bytes, so
an unchanged table is never rewritten.  Past :data:`MAX_PARTS` part ConfigMaps
(~45 MiB of gzip), or past :data:`MAX_TABLE_BYTES` (64 MiB) of one table's text
(~1.8 million destinations), the tables are refused with :class:`TableTooLarge`: the
text bound is what every reader inflates at most, so a corrupt or hostile ConfigMap
(a gzip bomb, a split bomb with a correct sha256) is refused before it costs more.

Layout: :mod:`.layout` writes the bodies, :mod:`.reader` reads them back.
"""

from __future__ import annotations

from .layout import (
    ANN_PARTS,
    ANN_REVISION,
    ANN_SHA256,
    BODY_MAX,
    CHUNK,
    COMPRESS_ABOVE,
    LABEL_INSTANCE,
    LABEL_PART,
    LIMIT,
    MANAGED_BY,
    MANIFEST,
    MAX_CHUNKS,
    MAX_PARTS,
    MAX_TABLE_BYTES,
    OPERATOR,
    OWNED_ANNOTATIONS,
    PART_INFIX,
    SUFFIX,
    TABLES,
    TableTooLarge,
    Unreadable,
    clear_cache,
    configmap_bodies,
    configmap_body,
    configmap_name,
    is_own_name,
    merge_patch,
    part_name,
    part_number,
    same_content,
    stale_parts,
)
from .reader import (
    reassemble,
)

__all__ = [
    "ANN_PARTS",
    "ANN_REVISION",
    "ANN_SHA256",
    "BODY_MAX",
    "CHUNK",
    "COMPRESS_ABOVE",
    "LABEL_INSTANCE",
    "LABEL_PART",
    "LIMIT",
    "MANAGED_BY",
    "MANIFEST",
    "MAX_CHUNKS",
    "MAX_PARTS",
    "MAX_TABLE_BYTES",
    "OPERATOR",
    "OWNED_ANNOTATIONS",
    "PART_INFIX",
    "SUFFIX",
    "TABLES",
    "TableTooLarge",
    "Unreadable",
    "clear_cache",
    "configmap_bodies",
    "configmap_body",
    "configmap_name",
    "is_own_name",
    "merge_patch",
    "part_name",
    "part_number",
    "reassemble",
    "same_content",
    "stale_parts",
]
