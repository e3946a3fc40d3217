"""A fake accelerator platform for pllm's plugin tests (runs on the host)."""
