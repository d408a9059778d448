"""The on-storage contract (docs/FORMAT.md): file names, the manifest, the item index, the layout of a
stored tensor blob, and the restricted unpickling every reader uses. Builds on the core only."""
