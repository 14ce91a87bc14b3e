"""Test helpers shared across test folders: local stand-ins for remote services (the Hugging Face Hub)."""
