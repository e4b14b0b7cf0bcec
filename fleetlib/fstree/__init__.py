"""The shared model: file trees, scanning, hashing, the object store, filters,
triggers and diffs. A pure library: no servers, and no component imports."""
