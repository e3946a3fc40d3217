"""The Triton GPU stack the cuda and rocm platforms both register: the
PagedAttention backend and its kernels, CUDA/HIP graph capture of the decode
step, the GPU KV-cache budget and the base platform for GPUs torch drives
through its ``cuda`` device type. Imports only ``pllm.platforms.common``
among the platforms; triton itself is imported lazily."""
