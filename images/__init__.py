"""Image input: everything between a WebDataset shard and a model's input tensor, shared by the cache pass, the
training loader and the server, so a student sees exactly the pixels its teacher labelled.

- `shards`        strict WebDataset reading (one sample = the adjacent files of one `__key__`), shard identity
                   (size, mtime, ctime, inode / ETag) and content hash
- `decode`        bytes -> uint8 pixels (Pillow on the CPU, nvjpeg in batches on a GPU), labels from `.cls`
- `decode_pool`   CPU decoding in worker processes (a crashing codec takes one process, never the caller)
- `views`         the augmentation views (`ViewPolicy`, `sample_views`) and `replay_view`, the only code that turns
                   (image, view params) into pixels
- `preprocessing` the teacher's preprocessing as given (`PreprocessingConfig`) and as resolved (`Preprocessing`)
- `shard_writer`  `distill shards`: image folders or bundled real data sets -> ImageNet-WDS shards
"""
