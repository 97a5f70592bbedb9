"""``batchinfer serve``: the HTTP service (a warm model, requests gathered into batches, similar-image search)."""
