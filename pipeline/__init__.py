"""The ingestion engine (installed as nanodb.pipeline). One image flows through its modules in this order:

1. `walk`: DirectoryWalker finds image files (FoundFile); in watch mode `watch`'s FolderWatcher feeds them.
2. `decode`: ImageDecodePool reads, hashes and decodes each in a worker process (DecodedImage: its
   FileRecord and model-input pixels) through the media layer's one opener.
3. `embed`: ClipStage embeds batches of pixels; `ray_ingest` does stages 2 and 3 on a Ray cluster instead.
4. `append`: IndexAppender adds (FileRecords, vectors) batches to the sink (`sink`: what it writes into).

`coordinator`'s ScanPipeline joins the stages with bounded queues. The engine imports nothing of nanodb
but the media layer (`nanodb.media`).
"""
