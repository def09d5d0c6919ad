"""The cache stage (`distill cache`) and the cache contract that training reads.

The contract (`contract` declares it: the only module other stages import): `schema` (columns, metadata,
versions), `reader` (only manifest-listed files with a matching checksum), `locate` (which fingerprint directory, or
a verified mirror of an s3:// one), `topk` (pack, and rebuild at any temperature).

The stage: `run` (plan the incremental refresh, label, keep the manifest), `labeler` (one shard, pure), `ray_pool`
+ `actor_pool` (teacher actors that may die), `layout` + `placement` (where labellers run, with how many threads and
decode processes), `cache_file`, `manifest` (snapshot + journal, through core.storage), `fingerprint` (+ its memo
`fingerprint_memo`), `features` (the stored teacher embeddings, schema v2), `inspect_cache`, `metrics`.
Image input lives in `distill.images`, the teacher model in `distill.teacher`.
"""
