"""The inference engine: one owner of the base model, continuous batching of requests for
many LoRA adapters (and the base) in one decode loop. Import `InferenceEngine` from
`service.inference.engine` (this package imports nothing heavy by itself)."""
