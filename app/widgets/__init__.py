"""Reusable widgets: page frame, message banner, generated option form, memory bar."""
