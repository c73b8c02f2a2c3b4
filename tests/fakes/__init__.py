"""Test doubles that speak real protocols over real services (no mocks of the thing tested)."""
