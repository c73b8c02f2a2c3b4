"""RabbitMQ adapter: topology, confirmed publishing, event envelopes."""
