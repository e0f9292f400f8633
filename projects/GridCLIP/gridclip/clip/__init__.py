"""The CLIP layer: loading OpenAI CLIP weights, dense grid features, text embeddings."""
