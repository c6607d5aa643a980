"""Test helpers: tiny-model builders and slow explicit reference implementations of the rules."""
