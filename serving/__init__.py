"""What the draft and verify services share: model loading, the session store, the model worker that
times and (later) batches forward passes, error-to-status translation, and the gRPC server scaffold.
"""
