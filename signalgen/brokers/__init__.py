"""Message brokers: the low layer that talks to Redis and Google Pub/Sub."""
