"""The app's routes by concern: inference (completions, chat, models), adapter management, health and metrics."""
