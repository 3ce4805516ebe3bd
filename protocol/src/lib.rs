//! Pure AMQP 0-9-1 codec: frame splitting, command assembly and encoding (no I/O).
