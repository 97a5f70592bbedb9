"""The producer side: scan sources, enqueue shards, report status, collect rows. Never imports TensorFlow."""
