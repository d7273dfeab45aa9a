"""Turning raw data into img2dataset-style webdataset shards (`mmssl prep ...`).

Every source (a table of rows, an image folder, COCO captions, the synthetic world) becomes a list
of rows plus a per-row `process(index, row) -> Sample`; `data_prep.pipeline.write_dataset` does the
rest: deterministic shard assignment, worker processes, atomic writes, failures and the manifest.
"""
