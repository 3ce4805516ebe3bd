//! Runs the Python client suites (pika, aio-pika, kombu) against the warren binary.
