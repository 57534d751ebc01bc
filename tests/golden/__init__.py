"""Checkpoints and exports written by earlier easytrain commits, and the script that writes them (write_golden.py)."""
