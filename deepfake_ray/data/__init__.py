"""The data plane: sources (folder, s3://, kaggle:, sample), the decoder, `prepare`'s ingest,
near copies, and reading a work directory's images for training."""
