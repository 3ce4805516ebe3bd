//! Test harness: start the real warren binary on a free port with its own data directory.
