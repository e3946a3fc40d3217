"""Building blocks any platform plugin may import, a third-party wheel
included: the torch.distributed communicators (``communicator``), the
memory-budget KV-cache allocator (``allocator``), the shared-memory
all-reduce for ranks on one host (``shm``), the C++ extension builder
(``cpp``) and the XLA execution path the TPU and Neuron platforms share
(``xla``: static shapes, its cache layout and paged attention, the Pallas
kernel fit, the torch-xla calls). Nothing here imports a platform."""
