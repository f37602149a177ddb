"""Serving: the inference pipeline behind the OpenAI-compatible API.

``backend`` is the contract between the HTTP layer (butterfly.api) and the pipeline that runs the
engine stage to stage across nodes: the API tokenizes, validates and streams; the backend admits a
sequence, runs it through every stage and yields its tokens.
"""
