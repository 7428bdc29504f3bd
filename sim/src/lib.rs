//! The deterministic network simulator for crdt-rate-limiter (library and CLI).
