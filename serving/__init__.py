"""What the draft and verify services share: model loading, the session store and its KV caches, the
lean runtime, and the model worker that times, queues fairly and batches forward passes.
"""
