"""The cache stage (`distill cache`) and the cache contract that training reads.

The contract: `schema` (columns, metadata, versions), `reader` (only manifest-listed files with a matching
checksum), `locate` (which fingerprint directory, or a verified mirror of an s3:// one), `views` (the one replay of
a cached view), `decode`, `topk` (pack, and rebuild at any temperature), `teacher` (loading and fingerprinting),
`shards` (strict WebDataset reading, shard identity), `features` (teacher embeddings, schema v2).

The stage: `run` (plan the incremental refresh, label, keep the manifest), `labeler` (one shard, pure), `ray_pool`
+ `actor_pool` (teacher actors that may die), `decode_pool`, `cache_file`, `manifest` (snapshot + journal,
through core.storage), `fingerprint_memo`, `inspect_cache`, `metrics`, and `shard_writer` (`distill shards`).
"""
