"""What operators see: health, metrics, logs, audit events, the give-back outbox."""
