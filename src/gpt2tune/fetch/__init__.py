"""The fetch_model stage: a base model downloaded, resumed, checked."""
