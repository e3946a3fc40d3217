"""The XLA execution path shared by the TPU and Neuron platforms: the
platform base with its opt-in CPU emulation (``platform``), the cache
layout, static-shape KV scatter and pure-torch paged attention (``paged``),
the fit to torch-xla's Pallas ragged paged-attention kernel (``pallas``),
the attention backend over both (``attention``), the allocator, the
communicator over the ``xla`` process-group backend, and the few torch-xla
calls they make (``runtime``, imported lazily: nothing here needs torch_xla
to be imported, only to run on an XLA device)."""
