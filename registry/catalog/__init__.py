"""The model catalog: versions and aliases, artifacts (file system or S3), file formats
and their metadata, signing keys, and the watch folder that registers what is dropped
into it."""
