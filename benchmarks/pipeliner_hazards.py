"""Race hazards of Triton 3.6's software pipeliner in a kernel's TTGIR, read as text (no GPU).

``sm90_resources.py`` runs it on every kernel it compiles; benchmarks/NOTES.md §25 tells how
the hazard showed: gradients that differed from run to run.
"""

from __future__ import annotations

import re


def pipeliner_hazards(ttgir: str, num_stages: int) -> list[str]:
    """Shared buffers of a pipelined loop that an asynchronous wgmma may still read when a
    copy overwrites them. Triton 3.6's pipeliner gives a loaded tile that feeds both
    registers (local_load) and a product one slot fewer than the loop has stages, yet may
    leave the product in flight (the next wgmma wait allows pending groups), and the copy
    for a later iteration then writes the slot the product reads: gradients that differ from
    run to run (benchmarks/NOTES.md §25). A buffer counts when it has fewer slots than
    stages and a wgmma reads it asynchronously, after which a copy into it or the loop's
    back edge comes before a wait that retires every product (pendings = 0).
    Returns the buffers' names; none is the state every kernel should be in."""
    lines = ttgir.splitlines()
    slots = dict(re.findall(r"(%\w+) = ttg\.local_alloc : \(\) -> !ttg\.memdesc<(\d+)x", ttgir))
    hazards = []
    for buffer, n in slots.items():
        if int(n) >= num_stages:
            continue
        views = re.findall(r"(%\w+) = ttg\.memdesc_index " + re.escape(buffer) + r"\[", ttgir)
        for view in list(views):
            views += re.findall(r"(%\w+) = ttg\.memdesc_trans " + re.escape(view) + r"\b",
                                ttgir)
        reads = re.compile(r"warp_group_dot (?:[^\n]*[ ,])?(" + "|".join(map(re.escape, views))
                           + r")\b[^\n]*isAsync = true") if views else None
        copies = re.compile(r"async_copy_global_to_local %\w+, (" + "|".join(
            map(re.escape, views)) + r")\b") if views else None
        for i, line in enumerate(lines):
            if reads is None or not reads.search(line):
                continue
            # Unsafe if a copy into the buffer, or the loop's back edge (the next iteration
            # may copy first), comes before a wait that retires every product.
            for later in lines[i + 1:]:
                if "warp_group_dot_wait" in later and "pendings = 0 " in later:
                    break
                if copies.search(later) or "scf.yield" in later:
                    hazards.append(buffer.lstrip("%"))
                    break
            if hazards and hazards[-1] == buffer.lstrip("%"):
                break
    return hazards
