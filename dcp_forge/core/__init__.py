"""The pure core: declarations (patterns, components), topology and its policies, storage keys,
writer placement, resharding decisions and tensor helpers. Imports nothing of dcp_forge but errors;
no I/O, so every planning function is testable in one process."""
