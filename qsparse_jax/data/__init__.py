"""Data: tokenizers, corpus readers, the prepared-shard format (writer and reader), batches, SFT."""
