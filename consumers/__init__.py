"""RabbitMQ entry points: per-contact re-analysis and dead-letter replay."""
