"""Model servers (vLLM, vllm-mlx): their profiles, arguments, model files and memory needs."""
