"""The model: GPT-2 itself, its tokenizer, model folders and checkpoints, LoRA, Hugging Face,
memory estimates."""
