"""Analyzers turn a dialog into lead facts (never a score)."""
