"""The encode stage: text found, read, tokenized and split into data/encoded."""
