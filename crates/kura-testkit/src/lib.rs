//! Test support for kura (placeholder).
