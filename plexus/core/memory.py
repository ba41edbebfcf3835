"""What a program built once and keeps is taken out of the cyclic garbage collector's scans.

A full collection visits every tracked object: with the rows of hundreds of clusters
(300,000 entries, millions of objects) one takes over half a second, all of it on the event
loop, and churn brings one every few tens of seconds. Rows are freed by reference counting
as they are replaced or drained, frozen or not; freezing only stops the collector from
walking them again and again.
"""

from __future__ import annotations

import gc


def freeze_built_state() -> None:
    """Call once a large state is built (every remote cluster synced): the young objects'
    cyclic garbage is collected first (cheap), then everything alive is frozen."""
    gc.collect(1)
    gc.freeze()
