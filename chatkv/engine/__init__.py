"""Model loading and token generation. Knows nothing of SQLite or chunk files."""
