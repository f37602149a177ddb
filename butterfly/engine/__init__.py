"""The inference engine: a PyTorch Llama-family decoder over a node's own layers.

One small module per role (the gpt-fast / nano-vllm shape):

* ``config``:   ``ModelConfig.from_json`` reads config.json (Llama, Mistral, Qwen2) or refuses it;
* ``model``:    ``StageModel`` runs blocks [start, stop) over weight views; ``SeqChunk`` is one
                sequence's new tokens in a step (prefill and decode mix in one call);
* ``kvcache``:  ``KVCache`` holds a stage's keys/values within a byte budget (``KVCacheFull``);
* ``sampler``:  ``SamplingParams``, ``SeqSampler`` (greedy, temperature, top-p, seed per sequence);
* ``weights``:  tensors as views of the arena (``arena_weights``) or of a model dir (``open_model_dir``);
* ``generate``: a plain generation loop over chained stages (tests, bench, tools).

The engine knows nothing of processes, sockets, scheduling or HTTP: the serving layer builds those
on top of these modules.
"""
